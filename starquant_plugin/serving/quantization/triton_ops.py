"""Triton implementations of the STaR-Quant ops, registered for CUDA tensors in `ops.py`.

Same contract and maths as the torch implementation (the core's): tested against it on CPU
with Triton's interpreter (`TRITON_INTERPRET=1`, fp32/fp16; the interpreter's bf16 is
wrong) and on an H200 in bf16 (`scripts/gpu_check.py`, docs/performance.md "GPU check").

- `sgat_quantize_triton`: one program per (16 tokens, rotation block): subtract each token's
  state shift, rotate by the block's orthonormal Hadamard (fast Walsh-Hadamard butterflies in
  float32: 3-8x faster on an H200 than a float32 `tl.dot` against the matrix), atomic-max the
  row absmax; a second launch rotates again, scales by the state's clip, rounds half to even
  and stores int8 codes and the float32 per-token scale.
- `tac_triton`: one program per (token, block): `A[bucket, block] @ x_block + c[bucket]`.
"""

import torch
import triton
import triton.language as tl

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
def _butterfly(x, TOKENS: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    """One Walsh-Hadamard stage on [TOKENS, BLOCK]: (a, b) -> (a + b, a - b) for column pairs HALF apart."""
    x = tl.permute(tl.reshape(x, (TOKENS, BLOCK // (2 * HALF), 2, HALF)), (0, 1, 3, 2))
    a, b = tl.split(x)
    x = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(x, (TOKENS, BLOCK))


@triton.jit
def _sgat_rotated_tile(
    x_ptr, shift_ptr, rows, states, row_valid, column0, width,
    ROTATE: tl.constexpr, BLOCK: tl.constexpr, TOKENS: tl.constexpr, LOG2_BLOCK: tl.constexpr, NORM: tl.constexpr,
):
    """`(x - shift[state]) @ H` for `TOKENS` rows and the `BLOCK` columns from `column0`, float32,
    H the orthonormal Hadamard: the fast Walsh-Hadamard transform (log2(BLOCK) butterfly stages)
    times 1/sqrt(BLOCK)."""
    columns = column0 + tl.arange(0, BLOCK)
    mask = row_valid[:, None] & (columns[None, :] < width)
    x = tl.load(x_ptr + rows[:, None] * width + columns[None, :], mask=mask, other=0.0).to(tl.float32)
    x = x - tl.load(shift_ptr + states[:, None] * width + columns[None, :], mask=mask, other=0.0)
    if ROTATE:
        for stage in tl.static_range(LOG2_BLOCK):
            x = _butterfly(x, TOKENS, BLOCK, 1 << stage)
        x = x * NORM
    return x


@triton.jit
def _sgat_absmax_kernel(
    x_ptr, states_ptr, shift_ptr, absmax_ptr, tokens, width,
    ROTATE: tl.constexpr, BLOCK: tl.constexpr, TOKENS: tl.constexpr, LOG2_BLOCK: tl.constexpr, NORM: tl.constexpr,
):
    rows = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    row_valid = rows < tokens
    states = tl.load(states_ptr + rows, mask=row_valid, other=0).to(tl.int32)
    tile = _sgat_rotated_tile(x_ptr, shift_ptr, rows, states, row_valid, tl.program_id(1) * BLOCK,
                              width, ROTATE, BLOCK, TOKENS, LOG2_BLOCK, NORM)
    # Non-negative float32 maxima: atomic max across the row's column blocks.
    tl.atomic_max(absmax_ptr + rows, tl.max(tl.abs(tile), axis=1), mask=row_valid)


@triton.jit
def _sgat_quantize_kernel(
    x_ptr, states_ptr, shift_ptr, clip_ptr, absmax_ptr, codes_ptr, scales_ptr, tokens, width, qmax,
    ROTATE: tl.constexpr, BLOCK: tl.constexpr, TOKENS: tl.constexpr, LOG2_BLOCK: tl.constexpr, NORM: tl.constexpr,
):
    rows = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    row_valid = rows < tokens
    states = tl.load(states_ptr + rows, mask=row_valid, other=0).to(tl.int32)
    column0 = tl.program_id(1) * BLOCK
    tile = _sgat_rotated_tile(x_ptr, shift_ptr, rows, states, row_valid, column0, width,
                              ROTATE, BLOCK, TOKENS, LOG2_BLOCK, NORM)
    clip = tl.load(clip_ptr + states, mask=row_valid, other=1.0)
    absmax = tl.load(absmax_ptr + rows, mask=row_valid, other=1.0)
    scale = tl.maximum(absmax * clip, 1e-8) / qmax
    codes = tl.minimum(tl.maximum(_round_half_even(tile / scale[:, None]), -qmax), qmax)
    columns = column0 + tl.arange(0, BLOCK)
    tl.store(codes_ptr + rows[:, None] * width + columns[None, :], codes.to(tl.int8),
             mask=row_valid[:, None] & (columns[None, :] < width))
    if tl.program_id(1) == 0:
        tl.store(scales_ptr + rows, scale, mask=row_valid)


def sgat_quantize_triton(
    x: torch.Tensor, states: torch.Tensor, shift: torch.Tensor, clip: torch.Tensor, rotation_block: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `starquant::sgat_quantize`: x [tokens, in] -> (codes int8 [tokens, in], scales f32 [tokens, 1]).

    Two launches over (16-token tiles, column blocks): the rotated tile's row maxima (atomic max
    into one float32 per token), then the same tile rotated again and quantized. The rotation is
    recomputed rather than stored: it costs less than writing and reading a float32 copy.
    """
    tokens, width = x.shape
    block = rotation_block if rotation_block else min(1024, triton.next_power_of_2(width))
    if block & (block - 1) or (rotation_block and width % block):
        raise ValueError(f"the Triton SGAT kernel needs a power-of-two rotation block dividing {width}, got {block}")
    codes = torch.empty((tokens, width), dtype=torch.int8, device=x.device)
    scales = torch.empty((tokens, 1), dtype=torch.float32, device=x.device)
    if tokens:
        absmax = torch.zeros(tokens, dtype=torch.float32, device=x.device)
        x, states, shift = x.contiguous(), states.contiguous(), shift.float().contiguous()
        meta = dict(ROTATE=bool(rotation_block), BLOCK=block, TOKENS=_TOKENS_PER_PROGRAM,
                    LOG2_BLOCK=block.bit_length() - 1, NORM=block**-0.5)
        grid = (triton.cdiv(tokens, _TOKENS_PER_PROGRAM), triton.cdiv(width, block))
        _sgat_absmax_kernel[grid](x, states, shift, absmax, tokens, width, **meta)
        _sgat_quantize_kernel[grid](x, states, shift, clip.float().contiguous(), absmax, codes, scales,
                                    tokens, width, float(integer_range(bits)), **meta)
    return codes, scales


_TOKENS_PER_PROGRAM = 16


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
