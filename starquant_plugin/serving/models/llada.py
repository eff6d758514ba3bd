"""LLaDA as a vLLM model: bidirectional Llama blocks built from vLLM's parallel layers.

Module prefixes mirror the hub checkpoint (`model.transformer.blocks.{i}.q_proj`, ...,
`model.transformer.ff_out` as the LM head) with q/k/v fused into `qkv_proj` and the gate
(`ff_proj`) and up (`up_proj`) projections fused into `gate_up_proj`, declared in
`packed_modules_mapping` so compressed-tensors targets and ignores resolve the checkpoint's
own names. Tensor parallelism: heads and the MLP are split across ranks (column-parallel
in, row-parallel out), the vocabulary across ranks for the embedding and LM head. The
canvas forward (no KV cache, SDPA over each canvas) is the shared `DiffusionForLM`'s.
"""

import torch
from torch import nn
from torch.nn import functional as F
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix

from ...models.layers import RMSNorm
from ...models.llada.configuration_llada import LLaDAConfig
from .base import DiffusionForLM, canvas_attention, check_heads_split

__all__ = ["LLaDAForDiffusionLM"]


class LLaDABlock(nn.Module):
    """Pre-norm bidirectional attention, then a pre-norm SwiGLU MLP.

    The linears sit directly under the block prefix, as the checkpoint names them:
    `qkv_proj` (q/k/v fused, column-parallel), `attn_out` (row-parallel), `gate_up_proj`
    (gate `ff_proj` and up `up_proj` fused, column-parallel), `ff_out` (down, row-parallel).
    """

    def __init__(self, config: LLaDAConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        tp_size = check_heads_split(config.n_heads, config.n_kv_heads)
        self.head_dim = config.head_dim
        self.num_heads = config.n_heads // tp_size
        self.num_kv_heads = max(1, config.n_kv_heads // tp_size)
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.qkv_proj = QKVParallelLinear(
            hidden_size=config.d_model,
            head_size=self.head_dim,
            total_num_heads=config.n_heads,
            total_num_kv_heads=config.n_kv_heads,
            bias=config.include_qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.attn_out = RowParallelLinear(
            input_size=config.n_heads * self.head_dim,
            output_size=config.d_model,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.attn_out",
        )
        self.ff_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=config.d_model,
            output_sizes=[config.mlp_hidden_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.ff_out = RowParallelLinear(
            input_size=config.mlp_hidden_size,
            output_size=config.d_model,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.ff_out",
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """hidden_states [batch, seq, d_model] -> [batch, seq, d_model]."""
        shape = hidden_states.shape
        normed = self.attn_norm(hidden_states).reshape(-1, shape[-1])
        qkv, _ = self.qkv_proj(normed)
        attention = canvas_attention(qkv, shape[:2], self.num_heads, self.num_kv_heads, self.head_dim,
                                     attention_bias, position_embeddings)
        attention, _ = self.attn_out(attention)
        hidden_states = hidden_states + attention.view(shape)
        gate_up, _ = self.gate_up_proj(self.ff_norm(hidden_states).reshape(-1, shape[-1]))
        gate, up = gate_up.chunk(2, dim=-1)
        mlp, _ = self.ff_out(F.silu(gate) * up)
        return hidden_states + mlp.view(shape)


class LLaDATransformer(nn.Module):
    """`model.transformer`: wte, blocks, ln_f and (untied) ff_out, the LM head."""

    def __init__(self, config: LLaDAConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.wte = VocabParallelEmbedding(
            config.embedding_size, config.d_model, quant_config=quant_config, prefix=f"{prefix}.wte"
        )
        self.blocks = nn.ModuleList(
            LLaDABlock(config, quant_config, f"{prefix}.blocks.{i}") for i in range(config.n_layers)
        )
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        if config.weight_tying:
            self.ff_out = ParallelLMHead(config.embedding_size, config.d_model, prefix=f"{prefix}.ff_out")
            self.ff_out = self.ff_out.tie_weights(self.wte)
        else:
            self.ff_out = ParallelLMHead(
                config.embedding_size, config.d_model, quant_config=quant_config, prefix=f"{prefix}.ff_out"
            )


class LLaDAVllmModel(nn.Module):
    """`model`: holds `transformer` (the hub prefix `model.transformer.`)."""

    def __init__(self, config: LLaDAConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.transformer = LLaDATransformer(config, quant_config, maybe_prefix(prefix, "transformer"))


class LLaDAForDiffusionLM(DiffusionForLM):
    """LLaDA (`LLaDAModelLM` checkpoints) for vLLM (`DiffusionForLM`: the canvas forward)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["ff_proj", "up_proj"]}
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj.": (".qkv_proj.", "q"),
            ".k_proj.": (".qkv_proj.", "k"),
            ".v_proj.": (".qkv_proj.", "v"),
            ".ff_proj.": (".gate_up_proj.", 0),
            ".up_proj.": (".gate_up_proj.", 1),
        }
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: LLaDAConfig = vllm_config.model_config.hf_config
        self.config = config
        self.model = LLaDAVllmModel(config, vllm_config.quant_config, maybe_prefix(prefix, "model"))
        scale = config.d_model**-0.5 if config.scale_logits else 1.0
        self.logits_processor = LogitsProcessor(config.embedding_size, scale=scale)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    @property
    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    @property
    def output_head(self) -> nn.Module:
        return self.model.transformer.ff_out

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.transformer.wte(input_ids)
        if self.config.input_emb_norm:
            embeddings = embeddings * self.config.d_model**0.5
        return embeddings
