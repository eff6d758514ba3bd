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

On CPU `sgat_quantize`, `sgat_quantize_padded` and `add_state_rows` run the C kernels built with the package
(`csrc/sgat_cpu.c`: vectorized passes per token, butterfly rotation, every torch thread); on CUDA tensors the Triton
kernels of `triton_ops.py` run when Triton is installed. The default implementation (any
device without those, and the CPU when the C kernel was not built: `SlowCPUKernelWarning`)
runs the core's torch code. The kernels sum each rotation in another order than the core's
matmul: a value within float32 rounding of a half-code boundary may take the neighbouring code.
"""

import warnings

import torch

from ...quantization.quantizers import integer_range, quantize_per_token
from ...quantization.sgat import SGATSite, sgat_transform_input
from ...quantization.tac import TACMap, apply_tac

__all__ = ["SlowCPUKernelWarning", "add_state_rows", "sgat_quantize", "sgat_quantize_padded", "sgat_quantize_torch", "tac", "with_sentinel"]


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


def _quantize_cpu(x, states, shift, clip, rotation_block: int, bits: int, codes_dtype: torch.dtype, pad: int):
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
                           torch.get_num_threads())
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
    return True


CPU_KERNEL = _register_cpu_kernel()
