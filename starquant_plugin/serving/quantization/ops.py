"""STaR-Quant custom ops (`torch.ops.starquant.*`), registered with `torch.library` so vLLM's
compilation can trace them (fake implementations give shapes and dtypes).

- `sgat_quantize(x, states, shift, clip, rotation_block, bits) -> (codes int8, scales f32)`:
  select the shift by token state, subtract, block-Hadamard rotate, per-token absmax
  quantize with the per-state clip. One fused call; the maths is the core's
  (`sgat_transform_input`, `quantize_per_token`).
- `tac(x, buckets, matrices, offsets) -> x`: the block-diagonal affine map of TAC per
  token's mask-ratio bucket (core `apply_tac`).

The default implementation (CPU, and any device without a better one) runs the core's
torch code; on CUDA tensors the Triton kernels of `triton_ops.py` run when Triton is
installed.
"""

import torch

from ...quantization.quantizers import quantize_per_token
from ...quantization.sgat import SGATSite, sgat_transform_input
from ...quantization.tac import TACMap, apply_tac

__all__ = ["sgat_quantize", "tac"]


@torch.library.custom_op("starquant::sgat_quantize", mutates_args=())
def sgat_quantize(
    x: torch.Tensor, states: torch.Tensor, shift: torch.Tensor, clip: torch.Tensor, rotation_block: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] (already smoothed), states [tokens] (1 = masked), shift [2, in], clip [2]
    -> codes [tokens, in] int8 and scales [tokens, 1] float32 with x~ ~= codes * scales."""
    site = SGATSite(torch.ones_like(shift[0]), shift, clip, rotation_block)
    states = states.long()
    # In float32 from the start: the rotation is a matmul, and CPUs without bf16 units run a
    # bf16 one ~20x slower than float32 (docs/performance.md); float32 is also the exact side.
    transformed = sgat_transform_input(x.float(), states, site)
    codes, scales = quantize_per_token(transformed, bits, clip.float()[states][..., None])
    return codes.to(torch.int8), scales


@sgat_quantize.register_fake
def _(x, states, shift, clip, rotation_block, bits):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("starquant::tac", mutates_args=())
def tac(x: torch.Tensor, buckets: torch.Tensor, matrices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [tokens, in], buckets [tokens] (long), matrices [K, in/b, b, b], offsets [K, in] -> [tokens, in].
    Computed in the matrices' dtype (float32 on CPU, where bf16 matmuls are slow), returned in x's."""
    return apply_tac(x.to(matrices.dtype), TACMap(matrices, offsets), buckets.long()).to(x.dtype)


@tac.register_fake
def _(x, buckets, matrices, offsets):
    return torch.empty_like(x)


def _register_triton_kernels() -> bool:
    try:
        from .triton_ops import sgat_quantize_triton, tac_triton
    except ImportError:  # no Triton: the torch implementation serves every device
        return False
    sgat_quantize.register_kernel("cuda")(sgat_quantize_triton)
    tac.register_kernel("cuda")(tac_triton)
    return True


TRITON_KERNELS = _register_triton_kernels()
