"""What every family's vLLM model shares: vLLM's model protocol over one canvas, and the
diffusion forward the engine calls (`diffusion_logits`).

A masked-diffusion model scores the whole canvas at every step with full (non-causal)
attention and keeps no KV cache, so attention is computed with torch SDPA over each canvas
rather than through vLLM's paged-attention layer; vLLM's scheduler is bypassed by the diffusion
engine (`starquant_plugin.serving.worker`). A subclass builds its modules and says where they are
(`blocks`, `final_norm`, `output_head`, `embed_input_ids`); the rotary and attention-mask maths are
the core's (`starquant_plugin.models.layers`).
"""

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.interfaces import SupportsQuant
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.sequence import IntermediateTensors

from ...diffusion.masking import token_states as token_states_from_ids
from ...models.layers import apply_rotary, padding_attention_bias, positions_from_attention_mask, repeat_kv, rotary_cos_sin
from ..kv_cache import current_kv_cache
from ..quantization.context import token_context

__all__ = ["DiffusionForLM", "canvas_attention", "check_heads_split"]


def check_heads_split(heads: int, kv_heads: int) -> int:
    """The tensor-parallel size, after checking that it splits the query and key/value heads."""
    tp_size = get_tensor_model_parallel_world_size()
    if heads % tp_size:
        raise ValueError(f"{heads} attention heads are not divisible by tensor_parallel_size={tp_size}")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads and tensor_parallel_size={tp_size}: one must divide the other")
    return tp_size


def canvas_attention(
    qkv: torch.Tensor,
    shape: tuple[int, int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    attention_bias: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Bidirectional attention over canvases of `shape` (batch, seq) from fused q/k/v rows
    [batch * seq, (heads + 2 kv_heads) * head_dim] (this rank's heads) -> the attention output
    [batch * seq, heads * head_dim]; rotary and GQA as in the core. Inside a `kv_cache_pass`
    the keys/values are recorded, or (the rows being positions `span` of the canvas) attend to
    the recorded ones of the rest of the canvas."""
    batch, seq = shape
    query, key, value = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    query = query.view(batch, seq, heads, head_dim).transpose(1, 2)
    key = key.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    value = value.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    cache = current_kv_cache()
    if cache is not None:
        key, value = cache.keys_values(key, value)
    key, value = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_bias, is_causal=False, scale=head_dim**-0.5
    )
    return output.transpose(1, 2).reshape(batch * seq, -1)


class DiffusionForLM(nn.Module, SupportsQuant):
    """Base of the families' vLLM models.

    `diffusion_logits(input_ids, attention_mask)` is what the diffusion engine calls: canvases
    [batch, seq] -> raw logits [batch, seq, vocab], gathered over tensor-parallel ranks (the
    family's logits shift is applied by the engine's sampler adapter, as in the core).
    `forward`/`compute_logits` follow vLLM's model protocol (flattened tokens, read as one
    canvas) so vLLM's start-up dummy runs work. Subclasses set `config`, `logits_processor`,
    `hf_to_vllm_mapper` and the properties below.
    """

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def output_head(self) -> nn.Module:
        """The LM head (`ParallelLMHead`)."""
        raise NotImplementedError

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- vLLM model protocol ----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flattened tokens [tokens] scored as one canvas -> hidden states [tokens, hidden]."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        ids = input_ids[None] if input_ids is not None else None
        return self.hidden_states(ids, inputs_embeds[None], positions[None], attention_mask=None)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.output_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

    # -- diffusion -----------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        span: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [batch, seq, hidden], positions [batch, seq] -> final-norm hidden states.

        The token states (masked or not, from `input_ids`) are published for the duration of
        the forward: STaR-Quant's linear method selects its per-state tensors with them.
        With `span=(lo, hi)` (cached decoding, `serving.kv_cache`) only canvas positions lo..hi-1
        are computed: `inputs_embeds` holds those, while `input_ids`, `positions` and
        `attention_mask` are the whole canvas's (keys of padding stay hidden; the mask ratio
        SGAT and TAC see is the whole canvas's).
        """
        dtype = inputs_embeds.dtype
        bias = padding_attention_bias(attention_mask, dtype) if attention_mask is not None else None
        if input_ids is None:
            states = torch.zeros(positions.shape, dtype=torch.long, device=inputs_embeds.device)
        else:
            states = token_states_from_ids(input_ids, self.config.mask_token_id).long()
        real = attention_mask.bool() if attention_mask is not None else None
        if span is not None:
            positions = positions[:, span[0]:span[1]]
        position_embeddings = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        hidden = inputs_embeds
        with token_context(states, real, span):
            for block in self.blocks:
                hidden = block(hidden, bias, position_embeddings)
        return self.final_norm(hidden)

    def diffusion_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, window: tuple[int, int] | None = None,
        span: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Canvases [batch, seq] (left padding hidden by `attention_mask`) -> raw logits [batch, seq, vocab].

        With `window=(lo, hi)` the LM head runs on positions lo..hi-1 only: logits [batch, hi - lo, vocab]
        (the sampler's `logits_window`; at an 8B model's vocabulary the head costs as much as a few blocks).
        With `span` (cached decoding, see `hidden_states`) only those positions are computed, and
        the window (default: the span) must lie inside it.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = positions_from_attention_mask(attention_mask)
        offset = 0
        if span is None:
            hidden = self.hidden_states(input_ids, self.embed_input_ids(input_ids), positions, attention_mask)
        else:
            window = window or span
            if not span[0] <= window[0] <= window[1] <= span[1]:
                raise ValueError(f"logits window {window} outside the computed span {span}")
            embeds = self.embed_input_ids(input_ids[:, span[0]:span[1]])
            hidden = self.hidden_states(input_ids, embeds, positions, attention_mask, span)
            offset = span[0]
        if window is not None:
            hidden = hidden[:, window[0] - offset:window[1] - offset]
        batch, seq, width = hidden.shape
        logits = self.compute_logits(hidden.reshape(batch * seq, width))
        return logits.view(batch, seq, -1)
