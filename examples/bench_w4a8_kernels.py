"""W4A8 GEMM kernels on this CPU at a LLaDA-8B linear shape, side by side (serve environment).

    OMP_NUM_THREADS=2 .venv/serve/bin/python examples/bench_w4a8_kernels.py [--n 4096 --k 4096 --tokens 512]

- `vllm dynamic_4bit`: what vLLM's CompressedTensorsW4A8Int uses on CPU (torch
  `_dyn_quant_matmul_4bit`; on x86 without KleidiAI a reference kernel);
- `starquant int4pack`: the `starquant` method's CPU W4A8 path without AMX (torch
  `_weight_int4pack_mm_for_cpu` on int8 codes in bf16, packed int4 weights, bf16 group scales);
- `starquant amx int4`: its path on AMX CPUs (`starquant::int4_amx_mm`: AMX-INT8 tiles, exact
  int32 sums per group, the per-token scales in its epilogue; groups of 64-256), the whole
  `_int4_codes_gemm` call;
- `starquant vllm-amx int4`: its path on AMX CPUs for groups of 32 (vLLM's AMX W4A8 GEMM `int4_scaled_mm_cpu`
  with the sentinel column, then the per-token scales), the whole `_int4_codes_gemm` call;
- `starquant vnni int4`: its path on AVX512-VNNI or AVX2 CPUs without AMX (`starquant::int4_mm`,
  the per-token scales in its epilogue), the whole `_int4_codes_gemm` call, this CPU's fastest kernel;
- `int4_mm avx512_vnni` / `int4_mm avx2`: each C kernel of that op this CPU runs, called alone;
- `onednn int8 (W8A8)`: vLLM's oneDNN int8 GEMM on the same codes with int8 weights, for scale;
  `int8_mm amx (W8A8)`: the plugin's AMX int8 GEMM on them (AMX CPUs);
- `bf16 matmul` / `fp32 matmul`: the unquantized baselines.
Prints seconds per call (median of 3 after one warm-up), GFLOP/s and resident bytes per weight.
"""

import argparse

import torch

from vllm import _custom_ops as vllm_ops

from starquant_plugin.serving.quantization import config, ops  # the serving path's int4 GEMMs
from timing import timed  # examples/timing.py


LABELS = {"starquant_amx_int4": "starquant amx int4", "amx_int4": "starquant vllm-amx int4", "vnni_int4": "starquant vnni int4"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    n, k, m, g = args.n, args.k, args.tokens, args.group
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int32)
    scales = torch.rand(n, k // g, generator=generator) * 0.01
    codes = torch.randint(-127, 128, (m, k), generator=generator)

    uint4 = (weight + 8).to(torch.uint8)
    dyn = torch.ops.aten._dyn_quant_pack_4bit_weight(uint4[:, 1::2] << 4 | uint4[:, ::2], scales.to(torch.bfloat16), None, g, k, n)
    int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu((weight + 8).contiguous(), 2)
    scales_and_zeros = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1).to(torch.bfloat16).contiguous()
    dense = weight.float() * scales.repeat_interleave(g, 1)
    packed = {}
    runs = {"starquant_amx_int4": ops.int8_amx() and n % 32 == 0 and g in ops.INT4_AMX_GROUPS,
            "amx_int4": config.amx_int4_gemm() and n % config.AMX_INT4_BLOCK_N == 0, "vnni_int4": bool(ops.int4_kernels())}
    for layout in ("starquant_amx_int4", "amx_int4", "vnni_int4"):
        if runs[layout]:
            packed[layout] = torch.nn.Module()
            for name, tensor in config.pack_int4(weight, scales, g, layout).items():
                packed[layout].register_buffer(name, tensor)

    ones, int8_codes = torch.ones(m, 1), codes.to(torch.int8)
    int8_weight = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    onednn = vllm_ops.create_onednn_scaled_mm(int8_weight.t(), torch.rand(n, 1) * 0.01, torch.bfloat16, True, False)
    onednn_out = torch.empty(m, n, dtype=torch.bfloat16)
    int8_amx, int8_scales = ops.pack_int8_amx(int8_weight), torch.rand(n) * 0.01
    # The baselines' operands in their dtype once, as a served layer holds them.
    codes_bf16, codes_fp32, dense_bf16 = codes.to(torch.bfloat16), codes.float(), dense.to(torch.bfloat16)
    rows = {
        "vllm dynamic_4bit": (lambda: torch.ops.aten._dyn_quant_matmul_4bit(codes.float(), dyn, g, k, n), dyn),
        "starquant int4pack": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            codes.to(torch.bfloat16), int4pack, g, scales_and_zeros), int4pack),
        **{LABELS[layout]: (
            lambda layer=layer, layout=layout: config._int4_codes_gemm(layer, g, layout, int8_codes, ones, None,
                                                                        torch.bfloat16), layer.starquant_int4)
           for layout, layer in packed.items()},
        **{f"int4_mm {kernel}": (
            lambda kernel=kernel: ops.int4_mm_cpu(int8_codes, packed["vnni_int4"].starquant_int4,
                                                  packed["vnni_int4"].starquant_int4_scales, g, ones, None, None,
                                                  torch.bfloat16, kernel), packed["vnni_int4"].starquant_int4)
           for kernel in (ops.int4_kernels() if "vnni_int4" in packed else ())},
        "onednn int8 (W8A8)": (lambda: vllm_ops.onednn_scaled_mm(onednn, int8_codes, onednn_out, ones, None, None, None),
                               int8_weight),
        **({"int8_mm amx (W8A8)": (lambda: torch.ops.starquant.int8_mm(int8_codes, int8_amx, int8_scales, ones, None, None,
                                                                       None, torch.bfloat16), int8_amx)}
           if ops.int8_amx() else {}),
        "bf16 matmul": (lambda: codes_bf16 @ dense_bf16.t(), dense_bf16),
        "fp32 matmul": (lambda: codes_fp32 @ dense.t(), dense),
    }
    reference = codes.float() @ dense.t()
    # vLLM's AMX W4A8 kernel holds the group scales in bf16
    bf16_scales_reference = codes.float() @ (weight.float() * scales.to(torch.bfloat16).float().repeat_interleave(g, 1)).t()
    print(f"[{m} x {k}] @ [{k} x {n}], group {g}, {torch.get_num_threads()} threads")
    print(f"{'kernel':<24} {'s/call':>8} {'GFLOP/s':>8} {'bytes/weight':>12} {'rel. error':>10}")
    for name, (fn, resident) in rows.items():
        seconds = timed(fn, repeats=1 if name.startswith("vllm") else 3)
        # (the W8A8 row multiplies other weights: its error is not comparable)
        expected = bf16_scales_reference if name == LABELS["amx_int4"] else reference
        error = ((fn().float() - expected).abs().mean() / expected.abs().mean()).item() if "W8A8" not in name else float("nan")
        nbytes = resident.numel() * resident.element_size() + (scales_and_zeros.numel() * 2 if "int4" in name else 0)
        nbytes += n if "W8A8" in name else 0  # per-channel scales
        print(f"{name:<24} {seconds:>8.3f} {2 * m * n * k / seconds / 1e9:>8.1f} {nbytes / (n * k):>12.3f} {error:>10.4f}")


if __name__ == "__main__":
    main()
