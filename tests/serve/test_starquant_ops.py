"""`torch.ops.starquant.*`: the fused SGAT quantize op and the TAC op against the core maths."""

from pathlib import Path

import pytest
import torch

from starquant_plugin.quantization.quantizers import fake_quantize_per_token
from starquant_plugin.quantization.sgat import SGATSite, sgat_transform_input
from starquant_plugin.quantization.tac import TACMap, apply_tac
from starquant_plugin.serving.quantization import ops  # noqa: F401  (registers the ops)

ROOT = Path(__file__).resolve().parents[2]


def _inputs(tokens=12, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g) * 3
    states = (torch.rand(tokens, generator=g) < 0.5).long()
    shift = torch.randn(2, width, generator=g)
    clip = torch.tensor([0.9, 0.7])
    return x, states, shift, clip


def test_sgat_quantize_equals_core_transform_then_clipped_per_token_quantizer():
    x, states, shift, clip = _inputs()
    codes, scales = torch.ops.starquant.sgat_quantize(x, states, shift, clip, 32, 8)
    assert codes.dtype == torch.int8 and scales.shape == (12, 1)
    transformed = sgat_transform_input(x, states, SGATSite(torch.ones(64), shift, clip, 32))
    expected = fake_quantize_per_token(transformed, 8, clip[states][:, None])
    torch.testing.assert_close(codes.float() * scales, expected)
    # The clipped row maximum sits on the largest code, so a downstream absmax/127 quantizer
    # (vLLM's dynamic int8 kernels) recovers exactly these codes and scales.
    assert (codes.abs().amax(1) == 127).all()
    dequantized = codes.float() * scales
    requantized = torch.round(dequantized / (dequantized.abs().amax(1, keepdim=True) / 127))
    assert torch.equal(requantized, codes.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("tokens, width, block, bits", [
    (37, 4096, 128, 8), (5, 512, 256, 8), (16, 96, 32, 8), (9, 48, 16, 4), (7, 40, 8, 8), (3, 6, 2, 8),
    (20, 100, 0, 8), (20, 128, 0, 8), (11, 2048, 1024, 4), (3, 4096, 2048, 8), (0, 64, 32, 8), (6, 1024, 64, 8),
    (4, 1536, 512, 4),
])
def test_cpu_kernel_matches_the_core_maths(dtype, tokens, width, block, bits):
    """The C kernel (built by `make setup`) against the core's torch maths: every shape class it
    has a path for (blocks of 16+ columns in vectors, narrower blocks, no rotation; AVX-512 and
    portable vector code), bf16/fp32/fp16 inputs, 4 and 8 bits, 3-D inputs, no tokens."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_check import code_mismatches

    assert ops.CPU_KERNEL, "the C kernel of sgat_quantize was not built (make setup builds it)"
    g = torch.Generator().manual_seed(width + block + tokens)
    x = (torch.randn(tokens, width, generator=g) * 3 + torch.randn(width, generator=g)).to(dtype)
    states = (torch.rand(tokens, generator=g) < 0.5).to(torch.int32)
    shift, clip = torch.randn(2, width, generator=g), torch.tensor([0.9, 0.7])
    codes, scales = torch.ops.starquant.sgat_quantize(x, states, shift, clip, block, bits)
    expected_codes, expected_scales = ops.sgat_quantize_torch(x, states, shift, clip, block, bits)
    assert codes.dtype == torch.int8 and codes.shape == (tokens, width) and scales.shape == (tokens, 1)
    mismatched, wrong = code_mismatches(codes, expected_codes, x.float(), states, shift, block, expected_scales)
    assert wrong == 0, (mismatched, wrong)
    torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
    if tokens:
        folded, folded_scales = torch.ops.starquant.sgat_quantize(x.view(1, tokens, width), states.view(1, -1), shift,
                                                                  clip, block, bits)
        assert torch.equal(folded[0], codes) and torch.equal(folded_scales[0], scales)
    # Where the CPU has AVX-512, the rows above took sgat_avx512.c's passes wherever the shape
    # allows: the kernel's portable vector code gives the same codes and scales bit for bit.
    for codes_dtype, pad in ((torch.int8, 0), (torch.bfloat16, 32)):
        fast = ops._quantize_cpu(x, states, shift, clip, block, bits, codes_dtype, pad)
        portable = ops._quantize_cpu(x, states, shift, clip, block, bits, codes_dtype, pad, portable=True)
        assert torch.equal(fast[0], portable[0]) and torch.equal(fast[1], portable[1])
    # The same codes as bf16 integers, with and without the sentinel columns (for AMX GEMMs).
    for pad in (0, 32):
        padded, padded_scales = torch.ops.starquant.sgat_quantize_padded(x, states, shift, clip, block, bits, pad)
        assert padded.dtype == torch.bfloat16 and padded.shape == (tokens, width + pad)
        assert torch.equal(padded[:, :width], codes.to(torch.bfloat16)) and torch.equal(padded_scales, scales)
        if pad:
            assert (padded[:, width] == 127).all() and not padded[:, width + 1:].any()


def test_cpu_kernel_splits_rows_over_torchs_threads_with_the_same_result():
    x, states, shift, clip = _inputs(tokens=37, width=512)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 4):
            torch.set_num_threads(count)
            results.append(torch.ops.starquant.sgat_quantize(x.bfloat16(), states, shift, clip, 128, 8))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_add_state_rows_equals_torchs_add_bit_for_bit(dtype):
    """SGAT's compensation add, in place through the C kernel (bf16, float32; float16 and
    non-contiguous outputs take torch's code): the same bits as `output + table[states]`,
    infinities and NaN included."""
    g = torch.Generator().manual_seed(3)
    output = (torch.randn(33, 200, generator=g) * 100).to(dtype)
    output[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")]).to(dtype)
    table, states = (torch.randn(2, 200, generator=g) * 100).to(dtype), (torch.rand(33, generator=g) < 0.5).long()
    expected = output + table[states]
    for target in (output.clone(), output.t().contiguous().t()):
        torch.ops.starquant.add_state_rows(target, None, table, states)
        assert torch.equal(target.isnan(), expected.isnan())
        assert torch.equal(target[~target.isnan()], expected[~expected.isnan()])
    torch.library.opcheck(torch.ops.starquant.add_state_rows.default, (output.clone(), None, table, states))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_table", [True, False])
def test_add_state_rows_scales_rows_then_adds_rounding_once(dtype, with_table):
    """Per-token scales (the AMX int8 path's epilogue), with and without the compensation: within
    one rounding of the float64 result, on a contiguous output (the C kernel) and a strided one
    (torch's code, which rounds after each term)."""
    g = torch.Generator().manual_seed(4)
    output = (torch.randn(21, 96, generator=g) * 50).to(dtype)
    scales = torch.rand(21, 1, generator=g) + 0.01
    table = (torch.randn(2, 96, generator=g) * 50).to(dtype) if with_table else None
    states = (torch.rand(21, generator=g) < 0.5).long() if with_table else None
    scaled = output.double() * scales.double()
    added = table.double()[states] if with_table else torch.zeros_like(scaled)
    exact, eps = scaled + added, torch.finfo(dtype).eps
    # The C kernel rounds to the output dtype once (its float32 product adds 2^-24 of it); torch's
    # code rounds the product to the output dtype too.
    for target, bound in ((output.clone(), eps / 2 * exact.abs() + 2.0**-24 * scaled.abs()),
                          (output.t().contiguous().t(), eps / 2 * (exact.abs() + scaled.abs()))):
        torch.ops.starquant.add_state_rows(target, scales, table, states)
        assert target.dtype == dtype
        assert ((target.double() - exact).abs() <= bound * (1 + 1e-6)).all()
    torch.library.opcheck(torch.ops.starquant.add_state_rows.default, (output.clone(), scales, table, states))


def test_cpu_kernels_refuse_mismatched_shapes_before_reading_memory():
    x, states, shift, clip = _inputs(width=64)
    with pytest.raises(ValueError, match=r"shift has shape/size \(2, 32\), expected \(2, 64\)"):
        torch.ops.starquant.sgat_quantize(x, states, shift[:, :32], clip, 32, 8)
    with pytest.raises(ValueError, match="states has shape/size 5, expected 12"):
        torch.ops.starquant.sgat_quantize(x, states[:5], shift, clip, 32, 8)
    output = torch.zeros(12, 64)
    with pytest.raises(ValueError, match=r"table has shape/size \(2, 63\), expected \(2, 64\)"):
        torch.ops.starquant.add_state_rows(output, None, torch.zeros(2, 63), states)
    with pytest.raises(ValueError, match="row_scales has shape/size 11, expected 12"):
        torch.ops.starquant.add_state_rows(output, torch.ones(11), None, None)


@pytest.mark.parametrize("kernel", ["cpu", "torch"])
def test_int4_mm_refuses_mismatched_operands_in_the_kernel_and_the_torch_code(kernel):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-127, 128, (5, 64), generator=g, dtype=torch.int8)
    packed = ops.pack_int4_vnni(torch.randint(-8, 8, (32, 64), generator=g, dtype=torch.int8))
    scales, states = torch.rand(2, 32, generator=g), torch.tensor([0, 1, 0, 1, 1])
    bad = {
        r"scales has shape/size \(1, 32\), expected \(2, 32\)": (codes, packed, scales[:1], 32, None, None, None),
        r"packed has shape/size \(2, 4, 16, 4\), expected \(2, 8, 16, 4\)": (codes, packed[:, :4], scales, 32, None, None, None),
        "group 24 does not divide the input width 64": (codes, packed, scales, 24, None, None, None),
        "row_scales has shape/size 4, expected 5": (codes, packed, scales, 32, torch.ones(4), None, None),
        "states has shape/size 3, expected 5": (codes, packed, scales, 32, None, torch.zeros(2, 32), states[:3]),
        "codes int8": (codes.float(), packed, scales, 32, None, None, None),
    }
    with ops.int4_mm.set_kernel_enabled("cpu", kernel == "cpu"):  # disabled: the op's torch code
        for message, args in bad.items():
            with pytest.raises(ValueError, match=message):
                torch.ops.starquant.int4_mm(*args, torch.float32)


def test_cpu_kernel_refuses_a_rotation_block_that_does_not_divide_the_width():
    x, states, shift, clip = _inputs(width=48)
    with pytest.raises(ValueError, match="rotation block 32 is not a power of two dividing the input width 48"):
        torch.ops.starquant.sgat_quantize(x, states, shift, clip, 32, 8)


def test_without_the_c_kernel_the_op_warns_and_runs_the_torch_code():
    import subprocess
    import sys

    script = """
import sys, warnings
sys.modules["starquant_plugin.serving.quantization._sgat_cpu"] = None  # as if never built
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from starquant_plugin.serving.quantization import ops
import torch
assert not ops.CPU_KERNEL
assert [w.category.__name__ for w in caught if "C kernel" in str(w.message)] == ["SlowCPUKernelWarning"], caught
x = torch.randn(4, 64)
codes, scales = torch.ops.starquant.sgat_quantize(x, torch.tensor([0, 1, 1, 0]), torch.zeros(2, 64), torch.ones(2), 32, 8)
padded, _ = torch.ops.starquant.sgat_quantize_padded(x, torch.tensor([0, 1, 1, 0]), torch.zeros(2, 64), torch.ones(2), 32, 8, 3)
assert torch.equal(padded, torch.cat([codes.bfloat16(), torch.tensor([[127.0, 0, 0]]).bfloat16().expand(4, 3)], 1))
print("fallback ok", codes.dtype)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fallback ok torch.int8" in done.stdout, done.stderr[-3000:]


def test_tac_op_equals_core_apply_tac():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 64, generator=g)
    buckets = torch.randint(0, 2, (10,), generator=g)
    matrices, offsets = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 64, generator=g)
    got = torch.ops.starquant.tac(x, buckets, matrices, offsets)
    torch.testing.assert_close(got, apply_tac(x, TACMap(matrices, offsets), buckets))


def test_ops_have_fake_implementations_for_tracing():
    x, states, shift, clip = _inputs()
    torch.library.opcheck(torch.ops.starquant.sgat_quantize.default, (x, states, shift, clip, 32, 8))
    torch.library.opcheck(torch.ops.starquant.sgat_quantize_padded.default, (x, states, shift, clip, 32, 8, 16))
    g = torch.Generator().manual_seed(2)
    torch.library.opcheck(
        torch.ops.starquant.tac.default,
        (torch.randn(6, 32, generator=g), torch.zeros(6, dtype=torch.long), torch.randn(1, 2, 16, 16, generator=g),
         torch.randn(1, 32, generator=g)),
    )


TRITON_CHECK = """
import sys
import pytest
import torch
from starquant_plugin.serving.quantization import ops
from starquant_plugin.serving.quantization.triton_ops import sgat_quantize_triton, tac_triton
from gpu_check import code_mismatches
assert ops.TRITON_KERNELS
for dtype in (torch.float32, torch.float16):
    # 12 tokens: one partial 16-token tile; 37: three tiles; 0: a width of one padded column block.
    for tokens, width, block in ((12, 64, 32), (12, 256, 128), (12, 96, 32), (12, 96, 0), (37, 512, 256)):
        g = torch.Generator().manual_seed(width + block)
        x = (torch.randn(tokens, width, generator=g) * 3).to(dtype)
        states = (torch.rand(tokens, generator=g) < 0.5).long()
        shift, clip = torch.randn(2, width, generator=g), torch.tensor([0.9, 0.7])
        expected_codes, expected_scales = torch.ops.starquant.sgat_quantize(x.float(), states, shift, clip, block, 8)
        codes, scales = sgat_quantize_triton(x, states, shift, clip, block, 8)
        # Summed in another order than the reference's matmul, a rotated value within float32
        # rounding of a half-code boundary may round to the neighbouring code; nothing else may differ.
        mismatched, wrong = code_mismatches(codes, expected_codes, x, states, shift, block, expected_scales)
        assert wrong == 0, (dtype, width, block, mismatched, wrong)
        torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
    x = torch.randn(10, 64, generator=g).to(dtype)
    buckets = torch.randint(0, 2, (10,), generator=g)
    matrices, offsets = torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.randn(2, 64, generator=g).to(dtype)
    got = tac_triton(x, buckets, matrices, offsets)
    assert got.dtype == dtype
    expected = torch.ops.starquant.tac(x.float(), buckets, matrices.float(), offsets.float())
    torch.testing.assert_close(got.float(), expected, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5 if dtype == torch.float32 else 1e-2)
print("triton ok")
"""


def test_triton_kernels_match_the_torch_ops_in_the_interpreter():
    """The CUDA kernels, run on CPU tensors by Triton's interpreter (fp32 and fp16)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="Triton comes with the serve environment")
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])},
    )
    assert done.returncode == 0 and "triton ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("bits, group", [(8, None), (4, None), (8, 16), (4, 32)])
def test_wna16_embedding_cpu_lookup_dequantizes_the_packed_rows(bits, group):
    """The CPU lookup of the `starquant` method's weight-only int embedding (vLLM's is Triton-only):
    rows packed by compressed-tensors' own `pack_to_int32` come back as codes * scale."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs

    from starquant_plugin.serving.quantization.config import WNA16EmbeddingMethod

    g = torch.Generator().manual_seed(bits)
    vocab, hidden = 40, 64
    qmax = 2 ** (bits - 1)
    codes = torch.randint(-qmax, qmax, (vocab, hidden), generator=g, dtype=torch.int8)
    scale = torch.rand(vocab, 1 if group is None else hidden // group, generator=g).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel" if group is None else "group",
                            group_size=group)
    layer = torch.nn.Module()
    layer.hidden_size = hidden
    layer.weight_packed = pack_to_int32(codes, bits)
    layer.weight_scale = scale
    ids = torch.tensor([[3, 0, 39, 3], [7, 7, 1, 20]])
    got = WNA16EmbeddingMethod(args).embedding(layer, ids)
    dense = (codes.float().view(vocab, scale.shape[1], -1) * scale.float()[..., None]).view(vocab, hidden)
    assert got.shape == (2, 4, hidden) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), dense[ids].to(torch.bfloat16).float(), rtol=0, atol=0)


def _int4_layout_runs(layout: str) -> bool:
    from starquant_plugin.serving.quantization import config

    return {"amx_int4": config.amx_int4_gemm(), "vnni_int4": ops.int4_kernels(),
            "starquant_amx_int4": ops.int8_amx()}.get(layout, True)


@pytest.mark.parametrize("layout", ["int4pack", "vnni_int4", "amx_int4", "starquant_amx_int4"])
@pytest.mark.parametrize("bits, clip", [(8, 1.0), (8, 1.5), (4, 1.0)])
def test_int4_codes_gemm_takes_the_codes_exactly(layout, bits, clip):
    """Packed int4 weights times activation codes of any bit width and clip (a clip above 1 leaves
    every code below the grid's top), all-zero rows included: the output is the exact integer
    product scaled per token, up to the bf16 roundings of the kernel's output and of the scaling.
    The AMX kernel quantizes its input per row itself; its sentinel column is what makes that exact."""
    from starquant_plugin.serving.quantization import config

    if not _int4_layout_runs(layout):
        pytest.skip(f"{layout} needs a CPU with {'AVX2 or AVX512-VNNI' if layout == 'vnni_int4' else 'AMX'}")
    g = torch.Generator().manual_seed(bits)
    n, k, group, tokens = 64, 256, 64, 9
    weight = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    weight_scale = torch.rand(n, k // group, generator=g) * 0.01 + 0.001
    top = int(round((2 ** (bits - 1) - 1) / clip))
    codes = torch.randint(-top, top + 1, (tokens, k), generator=g).to(torch.int8)
    codes[0] = 0
    scales = torch.rand(tokens, 1, generator=g) + 0.5
    layer = torch.nn.Module()
    for name, tensor in config.pack_int4(weight, weight_scale, group, layout).items():
        layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    states = torch.arange(tokens) % 2
    compensation = torch.randn(2, n, generator=g).to(torch.bfloat16)
    got = config._int4_codes_gemm(layer, group, layout, codes, scales, None, torch.bfloat16, compensation, states).float()
    # vLLM's AMX kernel and int4pack hold the group scales in bf16, ours in float32.
    held_scale = weight_scale.double() if layout in ("vnni_int4", "starquant_amx_int4") \
        else weight_scale.to(torch.bfloat16).double()
    dense = weight.double() * held_scale.repeat_interleave(group, 1)
    exact = (codes.double() @ dense.t()) * scales.double()
    assert torch.equal(got[0], compensation[0].float())  # an all-zero row: only its compensation
    error = (got.double() - compensation.double()[states] - exact).abs()
    # Two bf16 roundings of the product (2 * 2^-9 relative) plus one of the sum with the compensation.
    bound = 2 ** -8 * exact.abs() + 2 ** -8 * (exact.abs() + compensation.double().abs()[states]) + 1e-6
    assert (error <= bound).all(), (error / bound).max()


@pytest.mark.parametrize("kernel", ["avx512_vnni", "avx2"])
@pytest.mark.parametrize("tokens, n, k, group", [(1, 32, 64, 32), (13, 96, 512, 128), (40, 64, 512, 256), (8, 32, 192, 64)])
def test_int4_mm_kernel_sums_each_group_exactly(kernel, tokens, n, k, group):
    """Each C kernel of `starquant::int4_mm` against the exact product in float64: every group's
    integer sum is exact (AVX2's int16 pair sums included: the extreme codes -128 and 127 against
    the extreme weights), so a float32 output differs from it only by float32 rounding of the
    group scaling; bf16 outputs by one bf16 rounding of the result with the compensation added;
    rows past the last whole tile of 8 included. The kernels agree bit for bit; the packing
    round-trips."""
    if kernel not in ops.int4_kernels():
        pytest.skip(f"the {kernel} kernel of int4_mm does not run on this CPU")
    g = torch.Generator().manual_seed(n + k)
    weight = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    weight[0] = -8  # the extremes of both operands
    weight[1] = 7
    codes = torch.randint(-128, 128, (tokens, k), generator=g, dtype=torch.int8)
    codes[-1] = -128
    codes[0, : k // 2] = 127
    group_scales = torch.rand(k // group, n, generator=g) * 0.01 + 0.001
    row_scales = torch.rand(tokens, generator=g) + 0.5
    states = torch.randint(0, 2, (tokens,), generator=g)
    table = torch.randn(2, n, generator=g)
    packed = ops.pack_int4_vnni(weight)
    assert packed.shape == (n // 16, k // 8, 16, 4) and torch.equal(ops.unpack_int4_vnni(packed), weight)
    exact = torch.einsum("tgi,ngi,gn->tn", codes.double().view(tokens, -1, group), weight.double().view(n, -1, group),
                         group_scales.double()) * row_scales.double()[:, None]
    got = ops.int4_mm_cpu(codes, packed, group_scales, group, row_scales, table, states, torch.float32, kernel)
    expected = exact + table.double()[states]
    assert ((got.double() - expected).abs() <= 1e-5 * expected.abs() + 1e-5).all()
    got_bf16 = ops.int4_mm_cpu(codes, packed, group_scales, group, row_scales, table.bfloat16(), states,
                               torch.bfloat16, kernel)
    expected_bf16 = exact + table.bfloat16().double()[states]
    assert ((got_bf16.double() - expected_bf16).abs() <= 2 ** -8 * expected_bf16.abs() + 1e-5).all()
    plain = ops.int4_mm_cpu(codes, packed, group_scales, group, None, None, None, torch.float16, kernel)
    assert plain.dtype == torch.float16
    torch.testing.assert_close(plain.double(), exact / row_scales.double()[:, None], rtol=1e-3, atol=1e-3)
    fastest = torch.ops.starquant.int4_mm(codes, packed, group_scales, group, row_scales, table, states, torch.float32)
    assert torch.equal(fastest, got)  # the op runs this CPU's fastest kernel: the same sums
    torch.library.opcheck(torch.ops.starquant.int4_mm.default,
                          (codes, packed, group_scales, group, row_scales, table, states, torch.float32))


@pytest.mark.parametrize("kernel", ["avx512_vnni", "avx2"])
def test_int4_mm_kernel_rows_do_not_depend_on_the_row_count(kernel):
    """The kernels compute the last tile of m = 8q + r rows with r rows only: every row count 1-16
    gives, bit for bit, the first rows of the 16-row product (whose sums the test above checks
    exactly), in float32 and in bf16 with the compensation."""
    if kernel not in ops.int4_kernels():
        pytest.skip(f"the {kernel} kernel of int4_mm does not run on this CPU")
    g = torch.Generator().manual_seed(16)
    n, k, group = 64, 256, 64
    packed = ops.pack_int4_vnni(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8))
    codes = torch.randint(-128, 128, (16, k), generator=g, dtype=torch.int8)
    group_scales = torch.rand(k // group, n, generator=g) * 0.01 + 0.001
    row_scales = torch.rand(16, generator=g) + 0.5
    states = torch.randint(0, 2, (16,), generator=g)
    table = torch.randn(2, n, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        whole = ops.int4_mm_cpu(codes, packed, group_scales, group, row_scales, table.to(dtype), states, dtype, kernel)
        for m in range(1, 16):
            got = ops.int4_mm_cpu(codes[:m], packed, group_scales, group, row_scales[:m], table.to(dtype), states[:m],
                                  dtype, kernel)
            assert torch.equal(got, whole[:m]), (dtype, m)


needs_amx = pytest.mark.skipif(not ops.int8_amx(), reason="this CPU has no AMX-INT8: int8_mm runs its torch code")


@needs_amx
@pytest.mark.parametrize("tokens, n, k", [(1, 32, 64), (17, 64, 128), (33, 288, 1088), (64, 96, 3136)])
def test_int8_mm_amx_kernel_sums_exactly(tokens, n, k):
    """The AMX kernel of `starquant::int8_mm` against the exact product in float64: the int32 sums
    are exact (the extreme codes and weights included), so a float32 output differs only by the
    float32 rounding of the scales, the bias and the compensation; bf16 by one bf16 rounding.
    Covered: a last tile of fewer than 16 rows, a single tile row, input widths past one 1,024-input
    chunk (with a partial last chunk), output widths past one 256-column panel (with a partial
    panel); the packing round-trips; with the kernel disabled the op's torch code agrees."""
    g = torch.Generator().manual_seed(n + k)
    weight = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    weight[0], weight[1] = -128, 127
    codes = torch.randint(-128, 128, (tokens, k), generator=g, dtype=torch.int8)
    codes[0], codes[-1, : k // 2] = 127, -128
    col_scales = torch.rand(n, generator=g) * 0.01 + 0.001
    row_scales = torch.rand(tokens, 1, generator=g) + 0.5
    states = torch.randint(0, 2, (tokens,), generator=g)
    table, bias = torch.randn(2, n, generator=g), torch.randn(n, generator=g)
    packed = ops.pack_int8_amx(weight)
    assert packed.shape == (n // 32, k // 64, 2, 16, 64) and torch.equal(ops.unpack_int8_amx(packed), weight)
    exact = (codes.double() @ weight.double().t()) * col_scales.double() * row_scales.double()
    got = torch.ops.starquant.int8_mm(codes, packed, col_scales, row_scales, table, states, bias, torch.float32)
    expected = exact + bias.double() + table.double()[states]
    assert ((got.double() - expected).abs() <= 1e-6 * expected.abs() + 1e-4).all()
    got_bf16 = torch.ops.starquant.int8_mm(codes, packed, col_scales, row_scales, table.bfloat16(), states, None,
                                           torch.bfloat16)
    expected_bf16 = exact + table.bfloat16().double()[states]
    assert ((got_bf16.double() - expected_bf16).abs() <= 2 ** -8 * expected_bf16.abs() + 1e-4).all()
    plain = torch.ops.starquant.int8_mm(codes, packed, col_scales / 100, None, None, None, None, torch.float16)
    assert plain.dtype == torch.float16  # (scales / 100: within float16's range)
    torch.testing.assert_close(plain.double(), exact / row_scales.double() / 100, rtol=1e-3, atol=1e-3)
    with ops.int8_mm.set_kernel_enabled("cpu", False):
        reference = torch.ops.starquant.int8_mm(codes, packed, col_scales, row_scales, table, states, bias,
                                                torch.float32)
    torch.testing.assert_close(got, reference, rtol=1e-3, atol=1e-2)  # the torch code: float32 sums
    torch.library.opcheck(torch.ops.starquant.int8_mm.default,
                          (codes, packed, col_scales, row_scales, table, states, bias, torch.float32))


@needs_amx
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_amx_gemms_rows_do_not_depend_on_the_row_count(weights):
    """`int8_mm` and `int4_amx_mm` on AMX: every row count 1-48 gives, bit for bit, the first rows of
    the 48-row product: a row's output does not depend on the rows tiled with it (tiles of 16 and
    32 rows, zero padding)."""
    g = torch.Generator().manual_seed(48)
    n, k, group = 64, 1152, 128
    codes = torch.randint(-128, 128, (48, k), generator=g, dtype=torch.int8)
    row_scales = torch.rand(48, generator=g)
    states, table = torch.randint(0, 2, (48,), generator=g), torch.randn(2, n, generator=g).bfloat16()
    if weights == "int8":
        packed, col_scales = ops.pack_int8_amx(torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)), \
            torch.rand(n, generator=g)

        def gemm(m):
            return torch.ops.starquant.int8_mm(codes[:m], packed, col_scales, row_scales[:m], table, states[:m], None,
                                               torch.bfloat16)
    else:
        packed, group_scales = ops.pack_int4_amx(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)), \
            torch.rand(k // group, n, generator=g)

        def gemm(m):
            return torch.ops.starquant.int4_amx_mm(codes[:m], packed, group_scales, group, row_scales[:m], table,
                                                   states[:m], None, torch.bfloat16)
    whole = gemm(48)
    for m in range(1, 48):
        assert torch.equal(gemm(m), whole[:m]), m


@pytest.mark.parametrize("kernel", ["cpu", "torch"])
def test_int8_mm_refuses_mismatched_operands(kernel):
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-127, 128, (5, 128), generator=g, dtype=torch.int8)
    packed = ops.pack_int8_amx(torch.randint(-127, 128, (64, 128), generator=g, dtype=torch.int8))
    scales, states = torch.rand(64, generator=g), torch.tensor([0, 1, 0, 1, 1])
    bad = {
        "col_scales has shape/size 32, expected 64": (codes, packed, scales[:32], None, None, None, None),
        r"packed has shape/size \(2, 1, 2, 16, 64\), expected \(2, 2, 2, 16, 64\)": (codes, packed[:, :1], scales,
                                                                                       None, None, None, None),
        "row_scales has shape/size 4, expected 5": (codes, packed, scales, torch.ones(4), None, None, None),
        "states has shape/size 3, expected 5": (codes, packed, scales, None, torch.zeros(2, 64), states[:3], None),
        "bias has shape/size 63, expected 64": (codes, packed, scales, None, None, None, torch.zeros(63)),
        "codes int8": (codes.float(), packed, scales, None, None, None, None),
    }
    with ops.int8_mm.set_kernel_enabled("cpu", kernel == "cpu"):
        for message, args in bad.items():
            with pytest.raises(ValueError, match=message):
                torch.ops.starquant.int8_mm(*args, torch.float32)
    with pytest.raises(ValueError, match="n a multiple of 32 and k of 64"):
        ops.pack_int8_amx(torch.zeros(48, 64, dtype=torch.int8))


@needs_amx
@pytest.mark.parametrize("tokens, n, k, group", [(1, 32, 64, 64), (17, 64, 256, 128), (33, 288, 3072, 256),
                                                 (48, 96, 2112, 64)])
def test_int4_amx_mm_sums_each_group_exactly(tokens, n, k, group):
    """The AMX kernel of `starquant::int4_amx_mm` against the exact product in float64: each group's
    int32 sum is exact (the extreme codes and weights included), so a float32 output differs from
    it only by float32 rounding of the group scaling; bf16 by one more rounding. Covered: several
    1,024-input chunks and a partial last one, partial panels and row tiles; the packing
    round-trips; with the kernel disabled the op's torch code agrees."""
    g = torch.Generator().manual_seed(n + k + group)
    weight = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    weight[0], weight[1] = -8, 7
    codes = torch.randint(-128, 128, (tokens, k), generator=g, dtype=torch.int8)
    codes[0], codes[-1, : k // 2] = 127, -128
    group_scales = torch.rand(k // group, n, generator=g) * 0.01 + 0.001
    row_scales = torch.rand(tokens, generator=g) + 0.5
    states = torch.randint(0, 2, (tokens,), generator=g)
    table, bias = torch.randn(2, n, generator=g), torch.randn(n, generator=g)
    packed = ops.pack_int4_amx(weight)
    assert packed.shape == (n // 32, k // 64, 2, 8, 64) and torch.equal(ops.unpack_int4_amx(packed), weight)
    groups = torch.einsum("tgi,ngi,gn->tgn", codes.double().view(tokens, -1, group), weight.double().view(n, -1, group),
                          group_scales.double()) * row_scales.double()[:, None, None]
    exact = groups.sum(1)
    got = torch.ops.starquant.int4_amx_mm(codes, packed, group_scales, group, row_scales, table, states, bias,
                                          torch.float32)
    expected = exact + bias.double() + table.double()[states]
    # float32 adds up the scaled group sums: a rounding of up to 2^-24 of the running magnitude per group
    assert ((got.double() - expected).abs() <= 2 ** -22 * (k // group) * groups.abs().sum(1) + 1e-5).all()
    got_bf16 = torch.ops.starquant.int4_amx_mm(codes, packed, group_scales, group, row_scales, table.bfloat16(), states,
                                               None, torch.bfloat16)
    expected_bf16 = exact + table.bfloat16().double()[states]
    assert ((got_bf16.double() - expected_bf16).abs() <= 2 ** -8 * expected_bf16.abs() + 1e-5).all()
    with ops.int4_amx_mm.set_kernel_enabled("cpu", False):
        reference = torch.ops.starquant.int4_amx_mm(codes, packed, group_scales, group, row_scales, table, states, bias,
                                                    torch.float32)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-3)  # the torch code: float32 sums
    torch.library.opcheck(torch.ops.starquant.int4_amx_mm.default,
                          (codes, packed, group_scales, group, row_scales, table, states, bias, torch.float32))


@pytest.mark.parametrize("kernel", ["cpu", "torch"])
def test_int4_amx_mm_refuses_mismatched_operands(kernel):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-127, 128, (5, 128), generator=g, dtype=torch.int8)
    packed = ops.pack_int4_amx(torch.randint(-8, 8, (64, 128), generator=g, dtype=torch.int8))
    scales = torch.rand(2, 64, generator=g)
    bad = {
        r"scales has shape/size \(1, 64\), expected \(2, 64\)": (codes, packed, scales[:1], 64, None, None, None, None),
        "group 48 does not divide the input width 128": (codes, packed, scales, 48, None, None, None, None),
        "row_scales has shape/size 4, expected 5": (codes, packed, scales, 64, torch.ones(4), None, None, None),
        "bias has shape/size 63, expected 64": (codes, packed, scales, 64, None, None, None, torch.zeros(63)),
        "codes int8": (codes.float(), packed, scales, 64, None, None, None, None),
    }
    with ops.int4_amx_mm.set_kernel_enabled("cpu", kernel == "cpu"):
        for message, args in bad.items():
            with pytest.raises(ValueError, match=message):
                torch.ops.starquant.int4_amx_mm(*args, torch.float32)
    with pytest.raises(ValueError, match=r"integer values in \[-8, 7\]"):
        ops.pack_int4_amx(torch.full((32, 64), 9, dtype=torch.int8))
