"""Triton implementations of the STaR-Quant ops, registered for CUDA tensors in `ops.py`.

Same contract and maths as the torch implementation (the core's): tested against it on CPU
with Triton's interpreter (`TRITON_INTERPRET=1`, fp32/fp16; the interpreter's bf16 is
wrong), and on a GPU whenever the project gets one.

- `sgat_quantize_triton`: one program per token row: subtract the state's shift,
  block-Hadamard rotate (a `[blocks, b] @ [b, b]` dot against the orthonormal Hadamard),
  take the row absmax, scale by the state's clip, round half to even, store int8 codes and
  the float32 scale.
- `tac_triton`: one program per (token, block): `A[bucket, block] @ x_block + c[bucket]`.
"""

import torch
import triton
import triton.language as tl

from ...quantization.hadamard import hadamard_matrix
from ...quantization.quantizers import integer_range

__all__ = ["sgat_quantize_triton", "tac_triton"]


@triton.jit
def _round_half_even(v):
    floor = tl.floor(v)
    frac = v - floor
    odd = (floor - 2.0 * tl.floor(floor * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, floor + 1.0, floor)


@triton.jit
def _sgat_quantize_kernel(
    x_ptr, states_ptr, shift_ptr, clip_ptr, hadamard_ptr, codes_ptr, scales_ptr,
    width, n_blocks, qmax,
    ROTATE: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_P2: tl.constexpr,
):
    row = tl.program_id(0)
    state = tl.load(states_ptr + row).to(tl.int32)
    blocks = tl.arange(0, BLOCKS_P2)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    offsets = blocks * BLOCK + cols
    valid = (blocks < n_blocks) & (offsets < width)
    x = tl.load(x_ptr + row * width + offsets, mask=valid, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + state * width + offsets, mask=valid, other=0.0).to(tl.float32)
    x = x - shift
    if ROTATE:
        rows = tl.arange(0, BLOCK)[:, None]
        hadamard = tl.load(hadamard_ptr + rows * BLOCK + cols)
        x = tl.dot(x, hadamard, input_precision="ieee")
    clip = tl.load(clip_ptr + state).to(tl.float32)
    absmax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.maximum(absmax * clip, 1e-8) / qmax
    codes = tl.minimum(tl.maximum(_round_half_even(x / scale), -qmax), qmax)
    tl.store(codes_ptr + row * width + offsets, codes.to(tl.int8), mask=valid)
    tl.store(scales_ptr + row, scale)


def sgat_quantize_triton(
    x: torch.Tensor, states: torch.Tensor, shift: torch.Tensor, clip: torch.Tensor, rotation_block: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `starquant::sgat_quantize`: x [tokens, in] -> (codes int8 [tokens, in], scales f32 [tokens, 1])."""
    tokens, width = x.shape
    block = rotation_block if rotation_block else triton.next_power_of_2(width)
    n_blocks = width // block if rotation_block else 1
    # tl.dot wants every dimension >= 16.
    blocks_p2 = max(16, triton.next_power_of_2(n_blocks)) if rotation_block else 1
    hadamard = hadamard_matrix(block if rotation_block else 1, dtype=torch.float32, device=x.device)
    codes = torch.empty((tokens, width), dtype=torch.int8, device=x.device)
    scales = torch.empty((tokens, 1), dtype=torch.float32, device=x.device)
    if tokens:
        _sgat_quantize_kernel[(tokens,)](
            x.contiguous(), states.contiguous(), shift.float().contiguous(), clip.float().contiguous(), hadamard,
            codes, scales, width, n_blocks, float(integer_range(bits)),
            ROTATE=bool(rotation_block), BLOCK=block, BLOCKS_P2=blocks_p2,
        )
    return codes, scales


@triton.jit
def _tac_kernel(x_ptr, buckets_ptr, matrices_ptr, offsets_ptr, out_ptr, width, n_blocks, BLOCK: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    bucket = tl.load(buckets_ptr + row).to(tl.int32)
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * width + block * BLOCK + i).to(tl.float32)
    base = (bucket * n_blocks + block) * BLOCK * BLOCK
    matrix = tl.load(matrices_ptr + base + i[:, None] * BLOCK + i[None, :]).to(tl.float32)
    mapped = tl.sum(matrix * x[None, :], axis=1)
    offset = tl.load(offsets_ptr + bucket * width + block * BLOCK + i).to(tl.float32)
    tl.store(out_ptr + row * width + block * BLOCK + i, (mapped + offset).to(out_ptr.dtype.element_ty))


def tac_triton(x: torch.Tensor, buckets: torch.Tensor, matrices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Triton `starquant::tac`: x [tokens, in], buckets [tokens], matrices [K, in/b, b, b], offsets [K, in]."""
    tokens, width = x.shape
    n_blocks, block = matrices.shape[1], matrices.shape[-1]
    if block & (block - 1):
        raise ValueError(f"the Triton TAC kernel needs a power-of-two block size, got {block}")
    out = torch.empty_like(x)
    if tokens:
        _tac_kernel[(tokens, n_blocks)](
            x.contiguous(), buckets.contiguous(), matrices.contiguous(), offsets.contiguous(), out,
            width, n_blocks, BLOCK=block,
        )
    return out
