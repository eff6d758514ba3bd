"""Symmetric integer fake-quantizers (quantize then dequantize), as the integer kernels compute."""

import torch

__all__ = ["fake_quantize_per_token", "fake_quantize_weight", "integer_range", "quantize_per_token"]


def integer_range(bits: int) -> int:
    """Largest positive code of a symmetric signed `bits`-bit integer (127 for int8, 7 for int4)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    return 2 ** (bits - 1) - 1


def quantize_per_token(
    x: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (last-dim row) absmax quantization with a clip ratio.

    Args:
        x: [..., dim] activations.
        clip: scalar or tensor broadcastable to `x[..., :1]` — the fraction of each row's absmax
            mapped to the largest code; values beyond it saturate.

    Returns:
        (codes in [-qmax, qmax] as x's dtype, scales [..., 1]) with `x ~= codes * scales`.
    """
    qmax = integer_range(bits)
    scale = (x.abs().amax(dim=-1, keepdim=True) * clip).clamp(min=1e-8) / qmax
    return (x / scale).round().clamp(-qmax, qmax), scale  # symmetric: codes in [-qmax, qmax]


def fake_quantize_per_token(x: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """`quantize_per_token` followed by dequantization (what the integer kernels compute)."""
    codes, scale = quantize_per_token(x, bits, clip)
    return codes * scale


def fake_quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest symmetric weight quantization, per output channel or per input group.

    Args:
        weight: [out, in].
        group_size: None for one scale per output channel; otherwise one per `group_size` inputs.
    """
    out_features, in_features = weight.shape
    if group_size is None:
        return fake_quantize_per_token(weight, bits)
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    grouped = weight.reshape(out_features, in_features // group_size, group_size)
    return fake_quantize_per_token(grouped, bits).reshape(out_features, in_features)
