"""Dream as a vLLM model: bidirectional Qwen2 layers built from vLLM's parallel layers.

Module prefixes are the hub checkpoint's (Qwen2's: `model.layers.{i}.self_attn.q_proj`,
`model.layers.{i}.mlp.gate_proj`, `lm_head`, ...), with q/k/v (biases included) fused into
`self_attn.qkv_proj` and gate/up into `mlp.gate_up_proj`, declared in
`packed_modules_mapping` so compressed-tensors targets and ignores resolve the checkpoint's own
names. Tensor parallelism as in vLLM's Qwen2. The canvas forward (no KV cache, SDPA over each
canvas) is the shared `DiffusionForLM`'s; it returns Dream's raw logits (the family shifts them).
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

from ...models.dream.configuration_dream import DreamConfig
from ...models.layers import RMSNorm
from .base import DiffusionForLM, canvas_attention, check_heads_split

__all__ = ["DreamForDiffusionLM"]


class DreamAttention(nn.Module):
    """`self_attn`: q/k/v fused with their biases (column-parallel), `o_proj` (row-parallel)."""

    def __init__(self, config: DreamConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        tp_size = check_heads_split(heads, kv_heads)
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = heads // tp_size, max(1, kv_heads // tp_size)
        self.qkv_proj = QKVParallelLinear(
            hidden_size=config.hidden_size,
            head_size=self.head_dim,
            total_num_heads=heads,
            total_num_kv_heads=kv_heads,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            input_size=heads * self.head_dim,
            output_size=config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )

    def forward(self, normed: torch.Tensor, shape, attention_bias, position_embeddings) -> torch.Tensor:
        """normed [batch * seq, hidden] -> [batch * seq, hidden]."""
        qkv, _ = self.qkv_proj(normed)
        attention = canvas_attention(qkv, shape, self.num_heads, self.num_kv_heads, self.head_dim,
                                     attention_bias, position_embeddings)
        output, _ = self.o_proj(attention)
        return output


class DreamMLP(nn.Module):
    """`mlp`: gate/up fused (column-parallel), `down_proj` (row-parallel), SwiGLU."""

    def __init__(self, config: DreamConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=config.hidden_size,
            output_sizes=[config.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            input_size=config.intermediate_size,
            output_size=config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(normed)
        gate, up = gate_up.chunk(2, dim=-1)
        output, _ = self.down_proj(F.silu(gate) * up)
        return output


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config, quant_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DreamMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, hidden_states, attention_bias, position_embeddings) -> torch.Tensor:
        """hidden_states [batch, seq, hidden] -> [batch, seq, hidden]."""
        shape = hidden_states.shape
        normed = self.input_layernorm(hidden_states).reshape(-1, shape[-1])
        attention = self.self_attn(normed, shape[:2], attention_bias, position_embeddings)
        hidden_states = hidden_states + attention.view(shape)
        mlp = self.mlp(self.post_attention_layernorm(hidden_states).reshape(-1, shape[-1]))
        return hidden_states + mlp.view(shape)


class DreamVllmModel(nn.Module):
    """`model`: embed_tokens, layers, norm."""

    def __init__(self, config: DreamConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.embed_tokens"
        )
        self.layers = nn.ModuleList(
            DreamDecoderLayer(config, quant_config, f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamForDiffusionLM(DiffusionForLM):
    """Dream (`DreamModel` checkpoints) for vLLM (`DiffusionForLM`: the canvas forward)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj.": (".qkv_proj.", "q"),
            ".k_proj.": (".qkv_proj.", "k"),
            ".v_proj.": (".qkv_proj.", "v"),
            ".gate_proj.": (".gate_up_proj.", 0),
            ".up_proj.": (".gate_up_proj.", 1),
        }
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: DreamConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.model = DreamVllmModel(config, quant_config, maybe_prefix(prefix, "model"))
        if config.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                                 prefix=maybe_prefix(prefix, "lm_head"))
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                                 prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    @property
    def output_head(self) -> nn.Module:
        return self.lm_head

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)
