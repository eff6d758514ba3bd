"""What SGAT adds to one W8A8 linear on this CPU, at LLaDA-8B shapes, op by op (serve environment).

    OMP_NUM_THREADS=1 .venv/serve/bin/python examples/bench_sgat_overhead.py [--tokens 512] [--repeats 5]

For the q/k/v input (k=4096 -> n=12288) and the down projection (k=12288 -> n=4096), bf16
activations, half the tokens masked:
- `bf16 linear`: the unquantized layer (torch's bf16 GEMM: AMX or AVX512-BF16 where the CPU has them);
- `plain`: vLLM's W8A8 CPU path for a bf16 model (its fused dynamic int8 quantize + the oneDNN
  int8 GEMM; on AMX CPUs its AMX GEMM `int8_scaled_mm_with_quant`, which quantizes its bf16 input
  itself);
- `sgat_quantize`: the `starquant` op (shift by state, block-Hadamard 128, clipped per-token
  int8: the C kernel, `ops.CPU_KERNEL`), which feeds the GEMM its codes; `sgat torch code`:
  the same op in the core's torch code (its fallback); `compensation`: the per-state output add
  (`starquant::add_state_rows`, in place);
- on AMX CPUs, `starquant int8_mm`: our AMX GEMM on the codes with the per-token scales and the
  compensation in its epilogue (what a STaR-Quant W8A8 layer runs there after `sgat_quantize`);
- `rotation bf16` / `rotation fp32`: the block-Hadamard matmul alone in each dtype (why the op
  computes in float32 on CPU).
Prints milliseconds per call (median of `--repeats`, the ops called in turn, after one warm-up) and
the SGAT share of the GEMM.
"""

import argparse

import torch

from timing import timed_together  # examples/timing.py


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="calls of each op, taken in turn (the median is printed)")
    args = parser.parse_args()
    from vllm import _custom_ops as vllm_ops

    from starquant_plugin.quantization.hadamard import hadamard_matrix
    from starquant_plugin.serving.quantization import ops  # registers torch.ops.starquant

    t = args.tokens
    g = torch.Generator().manual_seed(0)
    print(f"{t} tokens, {torch.get_num_threads()} threads")
    print(f"{'k -> n':<14} {'op':<16} {'ms':>8}")
    for k, n in ((4096, 12288), (12288, 4096)):
        weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).t()  # [k, n], column-major
        handler = vllm_ops.create_onednn_scaled_mm(weight, torch.rand(1, n, generator=g) * 0.01, torch.bfloat16,
                                                   True, False, 32)
        x = torch.randn(t, k, generator=g).to(torch.bfloat16)
        states = (torch.rand(t, generator=g) < 0.5).long()
        shift, clip = torch.randn(2, k, generator=g) * 0.1, torch.tensor([0.9, 0.8])
        compensation = torch.randn(2, n, generator=g).to(torch.bfloat16)
        hadamard = hadamard_matrix(128)

        def gemm(codes, scales):
            out = torch.empty(t, n, dtype=torch.bfloat16)
            vllm_ops.onednn_scaled_mm(handler, codes, out, scales, None, None, None)
            return out

        def plain():
            codes, scales, _ = vllm_ops.onednn_scaled_int8_quant(x, None, None, True)
            return gemm(codes, scales)

        codes, scales = torch.ops.starquant.sgat_quantize(x, states, shift, clip, 128, 8)
        output = gemm(codes, scales)
        dense = torch.randn(n, k, generator=g).to(torch.bfloat16)
        rows = {
            "bf16 linear": lambda: torch.nn.functional.linear(x, dense),
            "plain": plain,
            "vllm quantize": lambda: vllm_ops.onednn_scaled_int8_quant(x, None, None, True),
            "gemm": lambda: gemm(codes, scales),
            "sgat_quantize": lambda: torch.ops.starquant.sgat_quantize(x, states, shift, clip, 128, 8),
            "sgat torch code": lambda: ops.sgat_quantize_torch(x, states, shift, clip, 128, 8),
            "compensation": lambda: torch.ops.starquant.add_state_rows(output, None, compensation, states),
            "rotation bf16": lambda: x.view(t, -1, 128) @ hadamard.to(torch.bfloat16),
            "rotation fp32": lambda: x.float().view(t, -1, 128) @ hadamard,
        }
        amx = ops.int8_amx() and hasattr(torch.ops._C, "int8_scaled_mm_with_quant")
        if amx:  # what vLLM and STaR-Quant run on AMX CPUs
            weight_nk = weight.t().contiguous()
            weight_scale = torch.rand(n, generator=g) * 0.01
            sgl_weight, packed = torch.ops._C.convert_weight_packed(weight_nk), ops.pack_int8_amx(weight_nk)
            rows["plain"] = lambda: torch.ops._C.int8_scaled_mm_with_quant(x, sgl_weight, weight_scale, None,
                                                                             torch.bfloat16, True)
            rows["starquant int8_mm"] = lambda: torch.ops.starquant.int8_mm(
                codes.reshape(t, k), packed, weight_scale, scales, compensation, states, None, torch.bfloat16)

            def plain_int8_mm():  # plain W8A8 on the same GEMM: vLLM's quantize, no compensation
                plain_codes, plain_scales, _ = vllm_ops.onednn_scaled_int8_quant(x, None, None, True)
                return torch.ops.starquant.int8_mm(plain_codes, packed, weight_scale, plain_scales, None, None, None,
                                                   torch.bfloat16)

            rows["plain on int8_mm"] = plain_int8_mm
        times = timed_together(rows, args.repeats)
        for name, seconds in times.items():
            print(f"{f'{k} -> {n}':<14} {name:<16} {seconds * 1e3:>8.2f}")
        print(f"{f'{k} -> {n}':<14} sgat_quantize / vLLM's quantize: {times['sgat_quantize'] / times['vllm quantize']:.2f}x "
              f"({'C kernel' if ops.CPU_KERNEL else 'torch code: the C kernel is not built'}; torch code "
              f"{times['sgat torch code'] / times['vllm quantize']:.2f}x)")
        if amx:  # against plain W8A8 on the same GEMM (vLLM's quantize, then int8_mm without compensation)
            added = times["sgat_quantize"] + times["starquant int8_mm"] - times["plain on int8_mm"]
            print(f"{f'{k} -> {n}':<14} SGAT W8A8 linear (sgat_quantize + int8_mm) "
                  f"{times['plain'] / (times['sgat_quantize'] + times['starquant int8_mm']):.2f}x the speed of "
                  f"vLLM's plain W8A8 linear on this CPU")
        else:
            added = times["sgat_quantize"] + times["compensation"] - times["vllm quantize"]
        base = times["plain on int8_mm"] if amx else times["plain"]
        print(f"{f'{k} -> {n}':<14} SGAT adds {added / base * 100:.1f}% to the plain W8A8 linear on the same GEMM; "
              f"SGAT W8A8 linear {times['bf16 linear'] / (base + added):.2f}x the bf16 linear's speed")


if __name__ == "__main__":
    main()
