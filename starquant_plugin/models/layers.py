"""Building blocks shared by the diffusion LLMs of every family: RMSNorm, rotary embeddings,
GQA key/value repetition, eager bidirectional attention, padding masks and positions."""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "RMSNorm", "apply_rotary", "eager_attention_forward", "padding_attention_bias", "positions_from_attention_mask",
    "repeat_kv", "rotary_cos_sin", "rotate_half",
]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, then scaled by `weight` in the input dtype (as in LLaDA and Qwen2)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = (hidden_states * torch.rsqrt(variance + self.eps)).to(input_dtype)
        return self.weight * hidden_states


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [batch, seq, head_dim] in float32 (LLaDA's `rope_full_precision`; Qwen2/Dream compute them so too)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [batch, heads, seq, head_dim] in float32 and return it in its own dtype."""
    x32 = x.to(torch.float32)
    cos, sin = cos[:, None], sin[:, None]
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * n_rep, seq, dim] for GQA."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq, dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq, dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq, dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def padding_attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2D padding mask [batch, seq] (1 = token) -> additive bias [batch, 1, 1, seq] hiding pad keys."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def positions_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only real tokens, so a left-padded row sees the same positions unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

