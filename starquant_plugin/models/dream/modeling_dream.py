"""Dream for transformers 5: a bidirectional Qwen2.5-style masked-diffusion LM.

Module names mirror the published checkpoints exactly, which are Qwen2's
(`model.layers.{i}.self_attn.q_proj`, ..., `lm_head`), so hub checkpoints load without renaming
and llm-compressor targets/ignores read the same as on the hub. Attention is fully
bidirectional; a 2D padding `attention_mask` hides padded keys. The forward returns raw logits:
Dream's logits at position i predict the token at position i + 1 (the shift is applied by
diffusion decoding, not here).
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ...diffusion.masking import token_states as token_states_from_ids
from ..base import DiffusionPreTrainedModel
from ..layers import (
    RMSNorm,
    apply_rotary,
    eager_attention_forward,
    padding_attention_bias,
    positions_from_attention_mask,
    rotary_cos_sin,
)
from .configuration_dream import DreamConfig

__all__ = [
    "DreamAttention", "DreamBaseModel", "DreamDecoderLayer", "DreamMLP", "DreamModel", "DreamPreTrainedModel",
    "DreamRMSNorm",
]

# The hub name of Dream's norm (the maths is the shared RMSNorm).
DreamRMSNorm = RMSNorm


class DreamAttention(nn.Module):
    """Bidirectional GQA self-attention with Qwen2's biases on the query, key and value projections."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # read by transformers' sdpa/flash attention functions
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.o_proj(attn_output.reshape(batch, seq, -1))


class DreamMLP(nn.Module):
    """SwiGLU: `down_proj(silu(gate_proj(x)) * up_proj(x))`, no biases."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class DreamDecoderLayer(nn.Module):
    """One Dream layer: pre-norm bidirectional attention, then a pre-norm SwiGLU MLP."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config, layer_idx)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DreamMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        token_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`token_states` [batch, seq] (1 = masked) is unused by the full-precision maths; it is
        routed here so quantization hooks on the layer (SGAT, TAC) see every token's state."""
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, position_embeddings
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DreamPreTrainedModel(DiffusionPreTrainedModel):
    config_class = DreamConfig
    config: DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True


class DreamBaseModel(nn.Module):
    """Embedding, layers and final norm (Qwen2's `model.*`; the LM head is beside it)."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns (final normed hidden states [batch, seq, hidden], hidden states per layer input
        + final, or None)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = inputs_embeds
        batch, seq = hidden_states.shape[:2]
        # Written out here, not in a shared helper: llm-compressor's sequential pipeline traces this
        # forward and must see the loop over the blocks in it.
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_attention_mask(attention_mask)
            else:
                position_ids = torch.arange(seq, device=hidden_states.device)[None].expand(batch, seq)
        bias = padding_attention_bias(attention_mask, hidden_states.dtype) if attention_mask is not None else None
        position_embeddings = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        token_states = token_states_from_ids(input_ids, self.config.mask_token_id) if input_ids is not None else None

        all_hidden_states = [] if output_hidden_states else None
        for block in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = block(hidden_states, bias, position_embeddings, token_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return hidden_states, tuple(all_hidden_states) if all_hidden_states is not None else None


class DreamModel(DreamPreTrainedModel):
    """Dream with its LM head (the hub's `DreamModel`): `forward(input_ids)` returns raw logits
    for every position.

    Raw logits: Dream's decoding reads the prediction for position i from the logits at
    position i - 1 (position 0 from its own); that shift is not applied here.
    """

    # A weight-tied Dream has no `lm_head` module at all (the logits read `embed_tokens.weight`),
    # so there is nothing for transformers to tie and no `lm_head.weight` in its state dict,
    # exactly as in the checkpoint.
    _tied_weights_keys = {}

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        return None if self.config.tie_word_embeddings else self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | slice | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [batch, seq] -> raw logits [batch, seq, vocab_size].

        `attention_mask` [batch, seq] marks real tokens (1) and padding (0); with it and no
        `position_ids`, positions count real tokens only. `logits_to_keep` (transformers'
        convention): 0 = every position, N = the last N, or a slice / index tensor of positions:
        the LM head runs on those only.
        """
        hidden_states, all_hidden_states = self.model(
            input_ids, attention_mask, position_ids, inputs_embeds, bool(output_hidden_states)
        )
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        hidden_states = hidden_states[:, logits_to_keep]
        if self.config.tie_word_embeddings:
            logits = F.linear(hidden_states, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden_states)
        return CausalLMOutputWithPast(logits=logits, hidden_states=all_hidden_states)
