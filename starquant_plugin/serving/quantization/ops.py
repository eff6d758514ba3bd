"""STaR-Quant custom ops (`torch.ops.starquant.*`), registered with `torch.library` so vLLM's
compilation can trace them (fake implementations give shapes and dtypes).

- `sgat_quantize(x, states, shift, clip, rotation_block, bits) -> (codes int8, scales f32)`:
  select the shift by token state, subtract, block-Hadamard rotate, per-token absmax
  quantize with the per-state clip. One fused call; the maths is the core's
  (`sgat_transform_input`, `quantize_per_token`).
- `sgat_quantize_padded(..., pad) -> (codes bf16, scales)`: the same codes as bf16 integers with
  `pad` extra columns (a sentinel 127, then zeros), for GEMMs that quantize their input themselves.
- `tac(x, buckets, matrices, offsets) -> x`: the block-diagonal affine map of TAC per
  token's mask-ratio bucket (core `apply_tac`).
- `add_state_rows(output, row_scales, table, states)`: `output = output * row_scales +
  table[states]` in place (either term None): per-token scales of a GEMM's output, SGAT's
  per-state compensation.
- `int4_mm(codes, packed, scales, group, row_scales, table, states, dtype)`: int8 codes times int4
  weights packed by `pack_int4_vnni`, with group scales, then `add_state_rows`'s epilogue: the W4A8 /
  W4A4 GEMM of CPUs with AVX512-VNNI or AVX2 and no AMX (`csrc/int4_vnni.c`: exact int32 sums per
  group; `int4_kernels()` lists the kernels this CPU runs).
- `int8_mm(codes, packed, col_scales, row_scales, table, states, bias, dtype)`: int8 codes times
  int8 weights packed by `pack_int8_amx`, then the per-token and per-channel scales, the bias and
  SGAT's per-state compensation in one epilogue: the W8A8 GEMM of AMX CPUs (`csrc/int8_amx.c`;
  `int8_amx()` says whether this CPU runs it), which takes SGAT's codes as they are.
- `int4_amx_mm(codes, packed, scales, group, row_scales, table, states, bias, dtype)`: the same
  with int4 weights packed by `pack_int4_amx` and float32 group scales: the W4A8 / W4A4 GEMM of
  AMX CPUs (exact int32 sums per weight group, scaled in float32).

On CPU `sgat_quantize`, `sgat_quantize_padded`, `add_state_rows` and `int4_mm` (and `int8_mm` on AMX CPUs) run the C kernels built with the package
(`csrc/sgat_cpu.c` with `csrc/sgat_avx512.c`: vectorized passes per token, butterfly rotation, every torch thread); on CUDA tensors the Triton
kernels of `triton_ops.py` run when Triton is installed. The default implementation (any
device without those, and the CPU when the C kernel was not built: `SlowCPUKernelWarning`)
runs the core's torch code. The kernels sum each rotation in another order than the core's
matmul: a value within float32 rounding of a half-code boundary may take the neighbouring code.
"""

import functools
import warnings

import torch

from ...quantization.quantizers import integer_range, quantize_per_token
from ...quantization.sgat import SGATSite, sgat_transform_input
from ...quantization.tac import TACMap, apply_tac

__all__ = ["SlowCPUKernelWarning", "add_state_rows", "int4_mm", "int4_kernels", "int4_amx_mm", "int8_amx", "int8_mm", "pack_int4_amx", "pack_int8_amx", "pack_int4_vnni", "sgat_quantize", "sgat_quantize_padded", "sgat_quantize_torch", "tac", "with_sentinel"]


class SlowCPUKernelWarning(UserWarning):
    """The C kernels of `sgat_quantize` and `add_state_rows` are not built (no C compiler at
    install): on CPU the ops run their torch code, several times slower. `make setup` (or
    `pip install -e .` with a C compiler) builds them."""


@torch.library.custom_op("starquant::sgat_quantize", mutates_args=())
def sgat_quantize(
    x: torch.Tensor, states: torch.Tensor, shift: torch.Tensor, clip: torch.Tensor, rotation_block: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] (already smoothed), states [tokens] (1 = masked), shift [2, in], clip [2]
    -> codes [tokens, in] int8 and scales [tokens, 1] float32 with x~ ~= codes * scales."""
    return sgat_quantize_torch(x, states, shift, clip, rotation_block, bits)


def sgat_quantize_torch(
    x: torch.Tensor, states: torch.Tensor, shift: torch.Tensor, clip: torch.Tensor, rotation_block: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sgat_quantize` in the core's torch code: the reference the kernels are tested against."""
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
    Computed in the matrices' dtype (float32 on CPUs without bf16 units, where bf16 matmuls are slow),
    returned in x's."""
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


@torch.library.custom_op("starquant::sgat_quantize_padded", mutates_args=())
def sgat_quantize_padded(
    x: torch.Tensor, states: torch.Tensor, shift: torch.Tensor, clip: torch.Tensor, rotation_block: int, bits: int,
    pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sgat_quantize` with the codes as bf16 integers (exact: |code| <= 127) in rows of `in + pad`
    columns, the `pad` extra columns (if any) a sentinel 127 then zeros: the input of a GEMM that
    quantizes its bf16 input per row itself (its scale is then 1 for every row, and the codes
    come back unchanged; the weights of the extra columns are zero)."""
    codes, scales = sgat_quantize_torch(x, states, shift, clip, rotation_block, bits)
    return with_sentinel(codes.to(torch.bfloat16), pad), scales


def _check_pad(pad: int) -> None:
    if pad < 0:
        raise ValueError(f"sgat_quantize_padded: pad {pad} < 0")


def with_sentinel(codes: torch.Tensor, pad: int) -> torch.Tensor:
    """bf16 codes [..., k] -> [..., k + pad]: a sentinel 127, then zeros (see `sgat_quantize_padded`)."""
    _check_pad(pad)
    extra = codes.new_zeros((*codes.shape[:-1], pad))
    extra[..., :1] = 127
    return torch.cat([codes, extra], -1)


@sgat_quantize_padded.register_fake
def _(x, states, shift, clip, rotation_block, bits, pad):
    return (x.new_empty((*x.shape[:-1], x.shape[-1] + pad), dtype=torch.bfloat16),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


def sgat_quantize_cpu(
    x: torch.Tensor, states: torch.Tensor, shift: torch.Tensor, clip: torch.Tensor, rotation_block: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C kernel of `starquant::sgat_quantize` (same contract), on torch's intra-op threads."""
    return _quantize_cpu(x, states, shift, clip, rotation_block, bits, torch.int8, 0)


def sgat_quantize_padded_cpu(x, states, shift, clip, rotation_block: int, bits: int, pad: int):
    """The C kernel of `starquant::sgat_quantize_padded` (same contract)."""
    _check_pad(pad)
    return _quantize_cpu(x, states, shift, clip, rotation_block, bits, torch.bfloat16, pad)


def _quantize_cpu(x, states, shift, clip, rotation_block: int, bits: int, codes_dtype: torch.dtype, pad: int,
                  portable: bool = False):
    """`portable`: the kernel's portable vector code even on a CPU where its AVX-512 row passes
    run (the tests compare the two)."""
    from . import _sgat_cpu

    width = x.shape[-1]
    if rotation_block and (rotation_block & (rotation_block - 1) or width % rotation_block):
        raise ValueError(f"rotation block {rotation_block} is not a power of two dividing the input width {width}")
    rows = x.reshape(-1, width)
    # The C kernel reads raw buffers: shapes are checked here, never trusted.
    _check_shape("states", states.numel(), rows.shape[0])
    _check_shape("shift", tuple(shift.shape), (2, width))
    _check_shape("clip", clip.numel(), 2)
    if rows.dtype not in (torch.bfloat16, torch.float32):
        rows = rows.float()
    rows = rows.contiguous()
    states = states.reshape(-1).long().contiguous()
    shift, clip = shift.float().contiguous(), clip.float().contiguous()
    codes = torch.empty((rows.shape[0], width + pad), dtype=codes_dtype)
    scales = torch.empty((rows.shape[0], 1), dtype=torch.float32)
    if rows.shape[0]:
        _sgat_cpu.quantize(rows.data_ptr(), int(rows.dtype == torch.bfloat16), states.data_ptr(), shift.data_ptr(),
                           clip.data_ptr(), codes.data_ptr(), int(codes_dtype == torch.bfloat16), width + pad,
                           scales.data_ptr(), rows.shape[0], width, rotation_block, float(integer_range(bits)),
                           torch.get_num_threads(), portable)
    return codes.reshape(*x.shape[:-1], width + pad), scales.reshape(*x.shape[:-1], 1)


@torch.library.custom_op("starquant::add_state_rows", mutates_args=("output",))
def add_state_rows(output: torch.Tensor, row_scales: torch.Tensor | None, table: torch.Tensor | None,
                   states: torch.Tensor | None) -> None:
    """output = output * row_scales + table[states], in place: a GEMM's rows scaled per token
    (row_scales [tokens] or [tokens, 1]), then SGAT's per-state compensation (table [2, out],
    states [tokens], output [tokens, out]); either term may be None."""
    _add_state_rows_torch(output, row_scales, table, states)


def _add_state_rows_torch(output, row_scales, table, states) -> None:
    if row_scales is not None:
        output.mul_(row_scales.reshape(-1, 1))
    if table is not None:
        output.add_(table[states.long()])


@add_state_rows.register_fake
def _(output, row_scales, table, states):
    return None


def add_state_rows_cpu(output: torch.Tensor, row_scales: torch.Tensor | None, table: torch.Tensor | None,
                       states: torch.Tensor | None) -> None:
    """The C kernel of `starquant::add_state_rows` for contiguous bf16 or float32 outputs: each
    element computed in float32 and rounded once (torch's code rounds after the scaling and again
    after the add; without scales the two agree bit for bit). Anything else takes the torch code."""
    from . import _sgat_cpu

    if not (output.is_contiguous() and output.dtype in (torch.bfloat16, torch.float32)
            and (table is None or table.dtype == output.dtype)):
        _add_state_rows_torch(output, row_scales, table, states)
        return
    width = output.shape[-1]
    rows = output.numel() // width if width else 0
    if row_scales is not None:
        _check_shape("row_scales", row_scales.numel(), rows)
    if table is not None:
        _check_shape("table", tuple(table.shape), (2, width))
        _check_shape("states", states.numel(), rows)
    table = table.contiguous() if table is not None else None
    states = states.reshape(-1).long().contiguous() if table is not None else None
    row_scales = row_scales.reshape(-1).float().contiguous() if row_scales is not None else None
    _sgat_cpu.add_state_rows(output.data_ptr(), int(output.dtype == torch.bfloat16),
                             row_scales.data_ptr() if row_scales is not None else 0,
                             table.data_ptr() if table is not None else 0, states.data_ptr() if table is not None else 0,
                             rows, width, torch.get_num_threads())


def pack_int4_vnni(weight: torch.Tensor) -> torch.Tensor:
    """int4 values [n, k] in [-8, 7] (n a multiple of 16, k of 8) -> `int4_mm`'s packed weights, uint8
    [n / 16, k / 8, 16, 4]: byte [c, i] of block (j, q) holds w[16 j + c, 8 q + i] + 8 in its low
    nibble and w[16 j + c, 8 q + 4 + i] + 8 in its high one (csrc/int4_vnni.c)."""
    n, k = weight.shape
    if n % 16 or k % 8:
        raise ValueError(f"pack_int4_vnni: weight [{n}, {k}] needs n a multiple of 16 and k of 8")
    stored = (weight.to(torch.int16) + 8).to(torch.uint8).reshape(n // 16, 16, k // 8, 2, 4)
    return (stored[..., 0, :] | (stored[..., 1, :] << 4)).permute(0, 2, 1, 3).contiguous()


def unpack_int4_vnni(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int4_vnni`'s inverse: int8 values [n, k] in [-8, 7]."""
    blocks, steps = packed.shape[:2]
    halves = torch.stack([packed & 15, packed >> 4], dim=2)  # [n / 16, k / 8, 2, 16, 4]
    return (halves.permute(0, 3, 1, 2, 4).reshape(blocks * 16, steps * 8).to(torch.int16) - 8).to(torch.int8)


@torch.library.custom_op("starquant::int4_mm", mutates_args=())
def int4_mm(codes: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int,
            row_scales: torch.Tensor | None, table: torch.Tensor | None, states: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """int8 codes [m, k] times int4 weights [n, k] (`pack_int4_vnni`) with float32 group scales
    [k / group, n] -> [m, n] in `dtype`, each row times `row_scales` [m] and plus `table[states]`
    (table [2, n] in `dtype`; either None). Computed in float32 from the dequantized weights here;
    the C kernel sums each group exactly in int32."""
    _check_int4_mm(codes, packed, scales, group, row_scales, table, states)
    return _int4_mm_torch(codes, packed, scales, group, row_scales, table, states, dtype)


def _check_int4_mm(codes, packed, scales, group: int, row_scales, table, states) -> None:
    """One clear error for operands `int4_mm` cannot take, before any kernel runs (the C kernel
    reads raw buffers: shapes are checked here, never trusted)."""
    if codes.dim() != 2 or codes.dtype != torch.int8 or packed.dim() != 4 or packed.dtype != torch.uint8:
        raise ValueError(f"int4_mm: codes int8 [m, k] and packed uint8 [n / 16, k / 8, 16, 4] expected, got "
                         f"{codes.dtype} {tuple(codes.shape)} and {packed.dtype} {tuple(packed.shape)}")
    m, k = codes.shape
    n = packed.shape[0] * 16
    if group <= 0 or k % group:
        raise ValueError(f"int4_mm: group {group} does not divide the input width {k}")
    _check_shape("packed", tuple(packed.shape), (n // 16, k // 8, 16, 4))
    _check_shape("scales", tuple(scales.shape), (k // group, n))
    _check_epilogue(m, n, row_scales, table, states, None)


def _int4_mm_torch(codes, packed, scales, group: int, row_scales, table, states, dtype) -> torch.Tensor:
    weight = unpack_int4_vnni(packed).float() * scales.t().repeat_interleave(group, 1)
    output = (codes.float() @ weight.t()).to(dtype)
    _add_state_rows_torch(output, row_scales, table, states)
    return output


@int4_mm.register_fake
def _(codes, packed, scales, group, row_scales, table, states, dtype):
    return codes.new_empty((codes.shape[0], packed.shape[0] * 16), dtype=dtype)


def int4_kernels() -> tuple[str, ...]:
    """The C kernels `int4_mm` can run on this CPU, fastest first: `avx512_vnni` (AVX512-VNNI),
    `avx2` (any x86-64-v3 CPU); empty without the C extension or on other CPUs."""
    return tuple(_int4_kernel_ids())


@functools.cache
def _int4_kernel_ids() -> dict[str, int]:
    try:
        from . import _sgat_cpu
    except ImportError:
        return {}
    return _sgat_cpu.int4_mm_kernels()


def int4_mm_cpu(codes, packed, scales, group: int, row_scales, table, states, dtype, kernel: str | None = None):
    """The C kernel of `starquant::int4_mm` (same contract): this CPU's fastest (`int4_kernels`),
    or `kernel`, where the shapes fit it (n a multiple of 32, group of 8); the torch code otherwise."""
    _check_int4_mm(codes, packed, scales, group, row_scales, table, states)
    k, n = codes.shape[1], packed.shape[0] * 16
    kernels = _int4_kernel_ids()
    if kernel is not None and kernel not in kernels:
        raise ValueError(f"int4_mm: kernel {kernel!r} does not run on this CPU (it runs {tuple(kernels)})")
    if not (kernels and n % 32 == 0 and group % 8 == 0 and k % group == 0):
        return _int4_mm_torch(codes, packed, scales, group, row_scales, table, states, dtype)
    kernel_id = kernels[kernel or next(iter(kernels))]
    if dtype not in (torch.float32, torch.bfloat16):  # float16: the kernel writes float32, cast once
        table = table.float() if table is not None else None
        return _int4_mm_c(codes, packed, scales, group, row_scales, table, states, torch.float32, kernel_id).to(dtype)
    return _int4_mm_c(codes, packed, scales, group, row_scales, table, states, dtype, kernel_id)


def _int4_mm_c(codes, packed, scales, group: int, row_scales, table, states, dtype, kernel_id: int) -> torch.Tensor:
    """The C kernel `kernel_id` on operands `_check_int4_mm` passed, output float32 or bf16."""
    from . import _sgat_cpu

    m, k = codes.shape
    n = packed.shape[0] * 16
    table = table.to(dtype) if table is not None else None
    codes, packed, scales = codes.contiguous(), packed.contiguous(), scales.float().contiguous()
    row_scales = row_scales.reshape(-1).float().contiguous() if row_scales is not None else None
    table = table.contiguous() if table is not None else None
    states = states.reshape(-1).long().contiguous() if table is not None else None
    output = torch.empty((m, n), dtype=dtype)
    padded = (m + 7) // 8 * 8  # the kernel's scratch: the codes regrouped by tiles of 8 rows, their group sums
    code_sums, tiles = torch.empty((padded, k // group), dtype=torch.int32), torch.empty((padded, k), dtype=torch.int8)
    if m:
        _sgat_cpu.int4_vnni_mm(codes.data_ptr(), packed.data_ptr(), scales.data_ptr(),
                               row_scales.data_ptr() if row_scales is not None else 0,
                               table.data_ptr() if table is not None else 0,
                               states.data_ptr() if table is not None else 0, output.data_ptr(), code_sums.data_ptr(),
                               tiles.data_ptr(),
                               m, n, k, group, int(dtype == torch.bfloat16), torch.get_num_threads(), kernel_id)
    return output


def pack_int8_amx(weight: torch.Tensor) -> torch.Tensor:
    """int8 weights [n, k] (n a multiple of 32, k of 64) -> `int8_mm`'s packed weights, int8
    [n / 32, k / 64, 2, 16, 64]: for columns 32 p + 16 h + c and inputs 64 s + 4 q + i, byte
    [p, s, h, q, 4 c + i] (AMX's B tile layout, csrc/int8_amx.c)."""
    n, k = weight.shape
    if weight.dtype != torch.int8 or n % 32 or k % 64:
        raise ValueError(f"pack_int8_amx: int8 weight [n, k] with n a multiple of 32 and k of 64 expected, got "
                         f"{weight.dtype} [{n}, {k}]")
    blocks = weight.reshape(n // 32, 2, 16, k // 64, 16, 4)  # [p, h, c, s, q, i]
    return blocks.permute(0, 3, 1, 4, 2, 5).reshape(n // 32, k // 64, 2, 16, 64).contiguous()


def unpack_int8_amx(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int8_amx`'s inverse: int8 weights [n, k]."""
    pairs, steps = packed.shape[:2]
    blocks = packed.reshape(pairs, steps, 2, 16, 16, 4)  # [p, s, h, q, c, i]
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(pairs * 32, steps * 64)


@torch.library.custom_op("starquant::int8_mm", mutates_args=())
def int8_mm(codes: torch.Tensor, packed: torch.Tensor, col_scales: torch.Tensor, row_scales: torch.Tensor | None,
            table: torch.Tensor | None, states: torch.Tensor | None, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """int8 codes [m, k] times int8 weights [n, k] (`pack_int8_amx`) -> [m, n] in `dtype`: each
    output times `row_scales` [m] and `col_scales` [n], plus `bias` [n] and `table[states]`
    (table [2, n]); row_scales, table and bias may be None. Computed in float32 here; the C
    kernel (AMX CPUs) sums exactly in int32 and rounds once."""
    _check_int8_mm(codes, packed, col_scales, row_scales, table, states, bias)
    return _int8_mm_torch(codes, packed, col_scales, row_scales, table, states, bias, dtype)


def _int8_mm_torch(codes, packed, col_scales, row_scales, table, states, bias, dtype) -> torch.Tensor:
    weight = unpack_int8_amx(packed).float() * col_scales.reshape(-1, 1).float()
    return _epilogue_torch(codes.float() @ weight.t(), row_scales, table, states, bias, dtype)


def _epilogue_torch(output, row_scales, table, states, bias, dtype) -> torch.Tensor:
    """The AMX GEMMs' epilogue on float32 products: row scales, bias, table[states], then `dtype`."""
    if row_scales is not None:
        output *= row_scales.reshape(-1, 1).float()
    if bias is not None:
        output += bias.float()
    if table is not None:
        output += table.float()[states.long().reshape(-1)]
    return output.to(dtype)


def _check_int8_mm(codes, packed, col_scales, row_scales, table, states, bias) -> None:
    if codes.dim() != 2 or codes.dtype != torch.int8 or packed.dim() != 5 or packed.dtype != torch.int8:
        raise ValueError(f"int8_mm: codes int8 [m, k] and packed int8 [n / 32, k / 64, 2, 16, 64] expected, got "
                         f"{codes.dtype} {tuple(codes.shape)} and {packed.dtype} {tuple(packed.shape)}")
    m, k = codes.shape
    n = packed.shape[0] * 32
    _check_shape("packed", tuple(packed.shape), (n // 32, k // 64, 2, 16, 64))
    _check_shape("col_scales", col_scales.numel(), n)
    _check_epilogue(m, n, row_scales, table, states, bias)


def _check_epilogue(m: int, n: int, row_scales, table, states, bias) -> None:
    if row_scales is not None:
        _check_shape("row_scales", row_scales.numel(), m)
    if bias is not None:
        _check_shape("bias", bias.numel(), n)
    if table is not None:
        _check_shape("table", tuple(table.shape), (2, n))
        _check_shape("states", -1 if states is None else states.numel(), m)


@int8_mm.register_fake
def _(codes, packed, col_scales, row_scales, table, states, bias, dtype):
    return codes.new_empty((codes.shape[0], packed.shape[0] * 32), dtype=dtype)


@functools.cache
def int8_amx() -> bool:
    """Whether this CPU runs `int8_mm`'s AMX kernel (AMX-INT8, and the C extension built)."""
    try:
        from . import _sgat_cpu
    except ImportError:
        return False
    return bool(_sgat_cpu.int8_amx_supported())


def int8_mm_cpu(codes, packed, col_scales, row_scales, table, states, bias, dtype):
    """The AMX kernel of `starquant::int8_mm` (same contract) where this CPU runs it; the torch code otherwise."""
    _check_int8_mm(codes, packed, col_scales, row_scales, table, states, bias)
    if not int8_amx():
        return _int8_mm_torch(codes, packed, col_scales, row_scales, table, states, bias, dtype)
    return _amx_mm(codes, packed, None, col_scales, 0, packed.shape[0] * 32, row_scales, table, states, bias, dtype)


def pack_int4_amx(weight: torch.Tensor) -> torch.Tensor:
    """int4 values [n, k] in [-8, 7] (n a multiple of 32, k of 64) -> `int4_amx_mm`'s packed weights,
    uint8 [n / 32, k / 64, 2, 8, 64]: `pack_int8_amx`'s tiles with rows q and q + 8 of each tile in
    the low and the high nibble of one byte row, stored + 8 (csrc/int8_amx.c)."""
    if weight.dtype.is_floating_point or weight.numel() and (int(weight.min()) < -8 or int(weight.max()) > 7):
        raise ValueError(f"pack_int4_amx: integer values in [-8, 7] expected, got {weight.dtype}")
    tiles = (pack_int8_amx(weight.to(torch.int8)).to(torch.int16) + 8).to(torch.uint8)  # [n / 32, k / 64, 2, 16, 64]
    return (tiles[..., :8, :] | (tiles[..., 8:, :] << 4)).contiguous()


def unpack_int4_amx(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int4_amx`'s inverse: int8 values [n, k] in [-8, 7]."""
    tiles = torch.cat([packed & 15, packed >> 4], dim=-2)
    return unpack_int8_amx((tiles.to(torch.int16) - 8).to(torch.int8))


@torch.library.custom_op("starquant::int4_amx_mm", mutates_args=())
def int4_amx_mm(codes: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int,
                row_scales: torch.Tensor | None, table: torch.Tensor | None, states: torch.Tensor | None,
                bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """int8 codes [m, k] times int4 weights [n, k] (`pack_int4_amx`) with float32 group scales
    [k / group, n] -> [m, n] in `dtype`, with `int8_mm`'s epilogue (row_scales, bias, table[states];
    each may be None). Computed in float32 here; the AMX kernel sums each group exactly in int32."""
    _check_int4_amx_mm(codes, packed, scales, group, row_scales, table, states, bias)
    return _int4_amx_mm_torch(codes, packed, scales, group, row_scales, table, states, bias, dtype)


def _check_int4_amx_mm(codes, packed, scales, group: int, row_scales, table, states, bias) -> None:
    if codes.dim() != 2 or codes.dtype != torch.int8 or packed.dim() != 5 or packed.dtype != torch.uint8:
        raise ValueError(f"int4_amx_mm: codes int8 [m, k] and packed uint8 [n / 32, k / 64, 2, 8, 64] expected, got "
                         f"{codes.dtype} {tuple(codes.shape)} and {packed.dtype} {tuple(packed.shape)}")
    m, k = codes.shape
    n = packed.shape[0] * 32
    if group <= 0 or k % group:
        raise ValueError(f"int4_amx_mm: group {group} does not divide the input width {k}")
    _check_shape("packed", tuple(packed.shape), (n // 32, k // 64, 2, 8, 64))
    _check_shape("scales", tuple(scales.shape), (k // group, n))
    _check_epilogue(m, n, row_scales, table, states, bias)


def _int4_amx_mm_torch(codes, packed, scales, group: int, row_scales, table, states, bias, dtype) -> torch.Tensor:
    weight = unpack_int4_amx(packed).float() * scales.float().t().repeat_interleave(group, 1)
    return _epilogue_torch(codes.float() @ weight.t(), row_scales, table, states, bias, dtype)


@int4_amx_mm.register_fake
def _(codes, packed, scales, group, row_scales, table, states, bias, dtype):
    return codes.new_empty((codes.shape[0], packed.shape[0] * 32), dtype=dtype)


def int4_amx_mm_cpu(codes, packed, scales, group: int, row_scales, table, states, bias, dtype):
    """The AMX kernel of `starquant::int4_amx_mm` (same contract) where this CPU runs it and the group
    is a multiple of 64 dividing 1,024; the torch code otherwise."""
    _check_int4_amx_mm(codes, packed, scales, group, row_scales, table, states, bias)
    if not (int8_amx() and group in INT4_AMX_GROUPS):
        return _int4_amx_mm_torch(codes, packed, scales, group, row_scales, table, states, bias, dtype)
    return _amx_mm(codes, None, packed, scales, group, packed.shape[0] * 32, row_scales, table, states, bias, dtype)


# Weight groups the AMX int4 kernel takes: whole 64-input tiles, whole groups in its 1,024-input chunks.
INT4_AMX_GROUPS = (64, 128, 256)


def _amx_mm(codes, packed, packed4, col_scales, group: int, n: int, row_scales, table, states, bias, dtype):
    """csrc/int8_amx.c on checked operands: int8 weights (`packed`) or int4 ones (`packed4`, group scales)."""
    from . import _sgat_cpu

    m, k = codes.shape
    out_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32  # float16: cast once after
    table = table.to(out_dtype).contiguous() if table is not None else None
    states = states.reshape(-1).long().contiguous() if table is not None else None
    row_scales = row_scales.reshape(-1).float().contiguous() if row_scales is not None else None
    bias = bias.reshape(-1).float().contiguous() if bias is not None else None
    codes, col_scales = codes.contiguous(), col_scales.float().contiguous()
    weights = (packed if packed is not None else packed4).contiguous()
    output = torch.empty((m, n), dtype=out_dtype)
    if m:
        threads, panel = torch.get_num_threads(), _sgat_cpu.INT8_AMX_PANEL_COLUMNS
        padded = (m + 15) // 16 * 16  # the kernel's scratch: codes regrouped by tiles, each thread's sums
        tiles = torch.empty((padded, k), dtype=torch.int8)
        sums = torch.empty((threads, padded, panel), dtype=torch.int32)
        unpacked = torch.empty((threads, panel * 1024), dtype=torch.int8) if packed4 is not None else None
        _sgat_cpu.int8_amx_mm(codes.data_ptr(), weights.data_ptr() if packed is not None else 0,
                              weights.data_ptr() if packed4 is not None else 0, col_scales.data_ptr(),
                              row_scales.data_ptr() if row_scales is not None else 0,
                              table.data_ptr() if table is not None else 0,
                              states.data_ptr() if table is not None else 0,
                              bias.data_ptr() if bias is not None else 0, output.data_ptr(), tiles.data_ptr(),
                              sums.data_ptr(), unpacked.data_ptr() if unpacked is not None else 0, m, n, k, group,
                              int(out_dtype == torch.bfloat16), threads)
    return output if out_dtype == dtype else output.to(dtype)


def _check_shape(name: str, got, expected) -> None:
    if got != expected:
        raise ValueError(f"starquant op: {name} has shape/size {got}, expected {expected}")


def _register_cpu_kernel() -> bool:
    try:
        from . import _sgat_cpu  # noqa: F401
    except ImportError:
        warnings.warn(SlowCPUKernelWarning(" ".join(SlowCPUKernelWarning.__doc__.split())), stacklevel=2)
        return False
    sgat_quantize.register_kernel("cpu")(sgat_quantize_cpu)
    sgat_quantize_padded.register_kernel("cpu")(sgat_quantize_padded_cpu)
    add_state_rows.register_kernel("cpu")(add_state_rows_cpu)
    int4_mm.register_kernel("cpu")(int4_mm_cpu)
    int8_mm.register_kernel("cpu")(int8_mm_cpu)
    int4_amx_mm.register_kernel("cpu")(int4_amx_mm_cpu)
    return True


CPU_KERNEL = _register_cpu_kernel()
