"""LLaDA for transformers 5: a bidirectional Llama-style masked-diffusion LM.

Module names mirror the published checkpoints exactly
(`model.transformer.blocks.{i}.q_proj`, ..., `model.transformer.ff_out` as the LM head), so
hub checkpoints load without renaming and llm-compressor targets/ignores read the same as
on the hub. Attention is fully bidirectional; a 2D padding `attention_mask` hides padded keys.
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
from .configuration_llada import LLaDAConfig

__all__ = ["LLaDAModel", "LLaDAModelLM", "LLaDAPreTrainedModel", "LLaDALlamaBlock", "LLaDARMSNorm"]

# The hub name of LLaDA's norm (the maths is the shared RMSNorm).
LLaDARMSNorm = RMSNorm


class LLaDALlamaBlock(nn.Module):
    """One LLaDA block: pre-norm bidirectional attention, then a pre-norm SwiGLU MLP.

    `ff_proj` is the gate, `up_proj` the up and `ff_out` the down projection (hub names).
    """

    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.d_model // config.n_heads
        self.num_key_value_groups = config.n_heads // config.n_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # read by transformers' sdpa/flash attention functions
        qkv_bias = config.include_qkv_bias
        self.attn_norm = LLaDARMSNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)
        self.ff_norm = LLaDARMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        token_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`token_states` [batch, seq] (1 = masked) is unused by the full-precision maths; it is
        routed here so quantization hooks on the block (SGAT, TAC) see every token's state."""
        batch, seq, _ = hidden_states.shape
        normed = self.attn_norm(hidden_states)
        query = self.q_proj(normed).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(normed).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(normed).view(batch, seq, -1, self.head_dim).transpose(1, 2)
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
        hidden_states = hidden_states + self.attn_out(attn_output.reshape(batch, seq, -1))

        normed = self.ff_norm(hidden_states)
        mlp = F.silu(self.ff_proj(normed)) * self.up_proj(normed)
        return hidden_states + self.ff_out(mlp)


class LLaDAPreTrainedModel(DiffusionPreTrainedModel):
    config_class = LLaDAConfig
    config: LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True


class LLaDAModel(nn.Module):
    """Embedding, blocks, final norm and LM head under the hub name `transformer`."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        modules = {
            "wte": nn.Embedding(config.embedding_size, config.d_model),
            "blocks": nn.ModuleList(LLaDALlamaBlock(config, i) for i in range(config.n_layers)),
            "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(modules)

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int | slice | torch.Tensor = 0,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns (logits [batch, seq, embedding_size], hidden states per block input + final, or None).

        `logits_to_keep` (transformers' convention): 0 = every position, N = the last N, or a
        slice / index tensor of positions: the LM head runs on those only.
        """
        transformer = self.transformer
        if inputs_embeds is None:
            inputs_embeds = transformer.wte(input_ids)
        hidden_states = inputs_embeds
        if self.config.input_emb_norm:
            hidden_states = hidden_states * self.config.d_model**0.5
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
        for block in transformer.blocks:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = block(hidden_states, bias, position_embeddings, token_states)
        hidden_states = transformer.ln_f(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)

        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        hidden_states = hidden_states[:, logits_to_keep]
        if self.config.weight_tying:
            logits = F.linear(hidden_states, transformer.wte.weight)
        else:
            logits = transformer.ff_out(hidden_states)
        if self.config.scale_logits:
            logits = logits * (1.0 / self.config.d_model**0.5)
        return logits, tuple(all_hidden_states) if all_hidden_states is not None else None


class LLaDAModelLM(LLaDAPreTrainedModel):
    """LLaDA with its LM head: `forward(input_ids)` returns logits for every position.

    Logits at position i predict the token at position i (no shift): a masked position is
    filled from its own logits.
    """

    # A weight-tied LLaDA has no `ff_out` module at all (the logits read `wte.weight`), so there
    # is nothing for transformers to tie.
    _tied_weights_keys = {}
    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module | None:
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.transformer.ff_out = value

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
        """input_ids [batch, seq] -> logits [batch, seq, embedding_size].

        `attention_mask` [batch, seq] marks real tokens (1) and padding (0); with it and no
        `position_ids`, positions count real tokens only.
        """
        logits, all_hidden_states = self.model(
            input_ids, attention_mask, position_ids, inputs_embeds, bool(output_hidden_states), logits_to_keep
        )
        return CausalLMOutputWithPast(logits=logits, hidden_states=all_hidden_states)
