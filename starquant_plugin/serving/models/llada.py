"""LLaDA as a vLLM model: bidirectional Llama blocks built from vLLM's parallel layers.

Module prefixes mirror the hub checkpoint (`model.transformer.blocks.{i}.q_proj`, ...,
`model.transformer.ff_out` as the LM head) with q/k/v fused into `qkv_proj` and the gate
(`ff_proj`) and up (`up_proj`) projections fused into `gate_up_proj`, declared in
`packed_modules_mapping` so compressed-tensors targets and ignores resolve the checkpoint's
own names. Tensor parallelism: heads and the MLP are split across ranks (column-parallel
in, row-parallel out), the vocabulary across ranks for the embedding and LM head.

A masked-diffusion model scores the whole canvas at every step with full (non-causal)
attention and keeps no KV cache, so attention is computed here with torch SDPA over each
canvas rather than through vLLM's paged-attention layer; vLLM's scheduler is bypassed by
the diffusion engine (`starquant_plugin.serving.worker`), which calls `diffusion_logits`.
The RMSNorm, rotary and attention-mask maths are the core's (`starquant_plugin.models.llada`).
"""

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsQuant
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors

from ..quantization.context import token_context

from ...diffusion.masking import token_states as token_states_from_ids
from ...models.llada.configuration_llada import LLaDAConfig
from ...models.llada.modeling_llada import (
    LLaDARMSNorm,
    apply_rotary,
    padding_attention_bias,
    positions_from_attention_mask,
    repeat_kv,
    rotary_cos_sin,
)

__all__ = ["LLaDAForDiffusionLM"]


class LLaDABlock(nn.Module):
    """Pre-norm bidirectional attention, then a pre-norm SwiGLU MLP.

    The linears sit directly under the block prefix, as the checkpoint names them:
    `qkv_proj` (q/k/v fused, column-parallel), `attn_out` (row-parallel), `gate_up_proj`
    (gate `ff_proj` and up `up_proj` fused, column-parallel), `ff_out` (down, row-parallel).
    """

    def __init__(self, config: LLaDAConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if config.n_heads % tp_size:
            raise ValueError(f"n_heads={config.n_heads} is not divisible by tensor_parallel_size={tp_size}")
        if config.n_kv_heads % tp_size and tp_size % config.n_kv_heads:
            raise ValueError(
                f"n_kv_heads={config.n_kv_heads} and tensor_parallel_size={tp_size}: one must divide the other"
            )
        self.head_dim = config.head_dim
        self.num_heads = config.n_heads // tp_size
        self.num_kv_heads = max(1, config.n_kv_heads // tp_size)
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.attn_norm = LLaDARMSNorm(config.d_model, config.rms_norm_eps)
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
        self.ff_norm = LLaDARMSNorm(config.d_model, config.rms_norm_eps)
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

    def attention(
        self,
        normed: torch.Tensor,
        attention_bias: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """normed [batch, seq, d_model] -> attention output projected, [batch * seq, d_model]."""
        batch, seq, _ = normed.shape
        qkv, _ = self.qkv_proj(normed.reshape(batch * seq, -1))
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = query.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        key = key.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = value.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        attention = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_bias, is_causal=False, scale=self.scaling
        )
        output, _ = self.attn_out(attention.transpose(1, 2).reshape(batch * seq, -1))
        return output

    def mlp(self, normed: torch.Tensor) -> torch.Tensor:
        """normed [tokens, d_model] -> [tokens, d_model]."""
        gate_up, _ = self.gate_up_proj(normed)
        gate, up = gate_up.chunk(2, dim=-1)
        output, _ = self.ff_out(F.silu(gate) * up)
        return output

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """hidden_states [batch, seq, d_model] -> [batch, seq, d_model]."""
        shape = hidden_states.shape
        attention = self.attention(self.attn_norm(hidden_states), attention_bias, position_embeddings)
        hidden_states = hidden_states + attention.view(shape)
        mlp = self.mlp(self.ff_norm(hidden_states).reshape(-1, shape[-1]))
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
        self.ln_f = LLaDARMSNorm(config.d_model, config.rms_norm_eps)
        if config.weight_tying:
            self.ff_out = ParallelLMHead(config.embedding_size, config.d_model, prefix=f"{prefix}.ff_out")
            self.ff_out = self.ff_out.tie_weights(self.wte)
        else:
            self.ff_out = ParallelLMHead(
                config.embedding_size, config.d_model, quant_config=quant_config, prefix=f"{prefix}.ff_out"
            )


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.transformer = LLaDATransformer(config, quant_config, maybe_prefix(prefix, "transformer"))


class LLaDAForDiffusionLM(nn.Module, SupportsQuant):
    """LLaDA (`LLaDAModelLM` checkpoints) for vLLM.

    `diffusion_logits(input_ids, attention_mask)` is what the diffusion engine calls: canvases
    [batch, seq] -> logits [batch, seq, embedding_size], gathered over tensor-parallel ranks.
    `forward`/`compute_logits` follow vLLM's model protocol (flattened tokens, read as one
    canvas) so vLLM's start-up dummy runs work.
    """

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
        quant_config = vllm_config.quant_config
        self.config = config
        self.model = LLaDAModel(config, quant_config, maybe_prefix(prefix, "model"))
        scale = config.d_model**-0.5 if config.scale_logits else 1.0
        self.logits_processor = LogitsProcessor(config.embedding_size, scale=scale)

    # -- vLLM model protocol ----------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.transformer.wte(input_ids)
        if self.config.input_emb_norm:
            embeddings = embeddings * self.config.d_model**0.5
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flattened tokens [tokens] scored as one canvas -> hidden states [tokens, d_model]."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        ids = input_ids[None] if input_ids is not None else None
        return self.hidden_states(ids, inputs_embeds[None], positions[None], attention_mask=None)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.model.transformer.ff_out, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

    # -- diffusion -----------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """inputs_embeds [batch, seq, d_model], positions [batch, seq] -> final-norm hidden states.

        The token states (masked or not, from `input_ids`) are published for the duration of
        the forward: STaR-Quant's linear method selects its per-state tensors with them.
        """
        transformer = self.model.transformer
        bias = padding_attention_bias(attention_mask, inputs_embeds.dtype) if attention_mask is not None else None
        position_embeddings = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        if input_ids is None:
            states = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        else:
            states = token_states_from_ids(input_ids, self.config.mask_token_id).long()
        real = attention_mask.bool() if attention_mask is not None else None
        hidden = inputs_embeds
        with token_context(states, real):
            for block in transformer.blocks:
                hidden = block(hidden, bias, position_embeddings)
        return transformer.ln_f(hidden)

    def diffusion_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, window: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Canvases [batch, seq] (left padding hidden by `attention_mask`) -> logits [batch, seq, vocab].

        With `window=(lo, hi)` the LM head runs on positions lo..hi-1 only: logits [batch, hi - lo, vocab]
        (the sampler's `logits_window`; at LLaDA-8B's vocabulary the head costs as much as a few blocks).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = positions_from_attention_mask(attention_mask)
        hidden = self.hidden_states(input_ids, self.embed_input_ids(input_ids), positions, attention_mask)
        if window is not None:
            hidden = hidden[:, window[0]:window[1]]
        batch, seq, width = hidden.shape
        logits = self.compute_logits(hidden.reshape(batch * seq, width))
        return logits.view(batch, seq, -1)
