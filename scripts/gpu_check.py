"""GPU check: what the plugin's CUDA path rests on, on a machine with only torch and Triton (no vLLM).

1. ops: the Triton kernels of `torch.ops.starquant.sgat_quantize` and `tac` against the torch
   implementation (the core's maths) on the device, at LLaDA-8B's widths: int8 codes equal but where float32 summation order moves a value
   across a half-code boundary (`code_mismatches`),
   scales within 1e-6 relative, TAC within float tolerance; time of each.
2. gemm: an SGAT-fed int8 GEMM (sgat_quantize, then `torch._int_mm` scaled per token and per
   output channel) against a bf16 linear, at LLaDA-8B's linear shapes on a 512-token canvas (and
   4096 tokens: batch 8): time ratio, and the int32 products checked exact against float64.
3. eval: the core's fake-quant evaluation (`starquant_plugin.load`, `evaluate_examples`) of the
   shipped models, and of any `--checkpoint`, on the device against the CPU: exact match on the
   first `--limit` held-out prompts of each (within one point).

Usage (`make gpu-check`; the GPU machine's python3 needs pydantic, loguru and, for quantized
checkpoints, compressed-tensors, which `make gpu-wheels` downloads as wheels to carry):

    python3 scripts/gpu_check.py [--device cuda] [--limit 200] [--checkpoint DIR ...] [--json OUT]

`--device cpu --quick` runs the same code on CPU (Triton's interpreter, small shapes): the test
suite does, so the script is known to run before a GPU is lent. Exit status 1 when a check fails.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# LLaDA-8B's linears (d_model 4096, MLP 12288; q/k/v and gate/up fused as vLLM builds them): (in, out).
LLADA_8B_LINEARS = {"qkv_proj": (4096, 12288), "attn_out": (4096, 4096), "gate_up_proj": (4096, 24576),
                    "ff_out": (12288, 4096)}
QUICK_LINEARS = {"qkv_proj": (256, 768), "ff_out": (512, 256)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton's interpreter)")
    parser.add_argument("--quick", action="store_true", help="small shapes and 20 prompts (the test suite's run)")
    parser.add_argument("--limit", type=int, default=None, help="held-out prompts per model (default 200; --quick 20)")
    parser.add_argument("--checkpoint", action="append", default=[], type=Path,
                        help="a (quantized) checkpoint to evaluate too; repeatable")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


def timed(fn, device, repeats: int, warmup: int = 2, eager: bool = False) -> float:
    """Seconds per `fn()`. CUDA: one call captured in a CUDA graph, replayed `repeats` times
    between two events (as vLLM runs a captured model: no Python launch cost); `eager`, or on
    CPU: the median of synchronized calls, launch overhead included."""
    import torch

    if device.type == "cuda" and not eager:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replays = max(repeats, 100)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / replays
    seconds = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def code_mismatches(codes, expected_codes, x, states, shift, rotation_block: int, scales) -> tuple[int, int]:
    """(codes differing, codes differing by more than one step or away from a half-code boundary).

    The Triton kernel sums each rotation in another order than the torch reference: a value
    within float32 rounding of a half-code boundary may round to the neighbouring code. The
    second count, checked against the float64 value, must be 0.
    """
    from starquant_plugin.quantization.sgat import SGATSite, sgat_transform_input

    site = SGATSite(shift.new_ones(shift.shape[-1]).double(), shift.double(), shift.new_ones(2).double(), rotation_block)
    exact = (sgat_transform_input(x.double(), states.long(), site) / scales.double()).abs()
    near_boundary = ((exact - exact.floor()) - 0.5).abs() <= 1e-4
    difference = (codes.long() - expected_codes.long()).abs()
    return int((difference != 0).sum()), int(((difference > 1) | ((difference == 1) & ~near_boundary)).sum())


def check_ops(device, quick: bool) -> dict:
    import torch

    from starquant_plugin.quantization.quantizers import quantize_per_token
    from starquant_plugin.quantization.sgat import SGATSite, sgat_transform_input
    from starquant_plugin.quantization.tac import TACMap, apply_tac
    from starquant_plugin.serving.quantization.triton_ops import sgat_quantize_triton, tac_triton

    tokens, repeats = (32, 1) if quick else (512, 20)
    # bf16 is what vLLM hands the ops on GPU; the interpreter's bf16 is wrong, so CPU checks fp16.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    rows, ok = [], True
    g = torch.Generator().manual_seed(0)
    for width, block in ((256, 128), (512, 256)) if quick else ((4096, 128), (12288, 128), (4096, 256)):
        x = (torch.randn(tokens, width, generator=g) * 3).to(dtype).to(device)
        states = (torch.rand(tokens, generator=g) < 0.5).long().to(device)
        shift, clip = torch.randn(2, width, generator=g).to(device), torch.tensor([0.9, 0.7], device=device)
        site = SGATSite(torch.ones(width, device=device), shift, clip, block)

        def reference():
            return quantize_per_token(sgat_transform_input(x.float(), states, site), 8, clip[states][..., None])

        expected_codes, expected_scales = reference()
        reference_ms = 1e3 * timed(reference, device, repeats, eager=True)
        codes, scales = sgat_quantize_triton(x, states, shift, clip, block, 8)
        mismatched, wrong = code_mismatches(codes, expected_codes, x, states, shift, block, expected_scales)
        scale_error = float(((scales - expected_scales).abs() / expected_scales.abs()).max())
        passed = wrong == 0 and scale_error <= 1e-6
        ok &= passed
        ms = 1e3 * timed(lambda: sgat_quantize_triton(x, states, shift, clip, block, 8), device, repeats)
        # W8A8's own activation quantize: the same kernel without the rotation.
        plain_ms = 1e3 * timed(lambda: sgat_quantize_triton(x, states, shift, clip, 0, 8), device, repeats)
        rows.append({"op": "sgat_quantize", "tokens": tokens, "width": width, "rotation_block": block,
                     "dtype": str(dtype), "codes_mismatched": mismatched, "codes_wrong": wrong,
                     "scale_max_rel_error": scale_error, "triton_ms": ms, "per_token_quantize_ms": plain_ms,
                     "torch_eager_ms": reference_ms, "passed": passed})
    width, b = (256, 32) if quick else (4096, 128)
    x = torch.randn(tokens, width, generator=g).to(dtype).to(device)
    buckets = torch.randint(0, 2, (tokens,), generator=g).to(device)
    matrices = (torch.randn(2, width // b, b, b, generator=g) / b**0.5).to(dtype).to(device)
    offsets = torch.randn(2, width, generator=g).to(dtype).to(device)
    got = tac_triton(x, buckets, matrices, offsets).float()
    expected = apply_tac(x.float(), TACMap(matrices.float(), offsets.float()), buckets)
    error = float((got - expected).abs().max() / expected.abs().max())
    passed = error < 2e-2  # one rounding to the 16-bit output dtype
    ok &= passed
    rows.append({"op": "tac", "tokens": tokens, "width": width, "block": b, "dtype": str(dtype), "max_rel_error": error,
                 "triton_ms": 1e3 * timed(lambda: tac_triton(x, buckets, matrices, offsets), device, repeats),
                 "torch_eager_ms": 1e3 * timed(lambda: apply_tac(x.float(), TACMap(matrices.float(), offsets.float()),
                                                                 buckets), device, repeats, eager=True), "passed": passed})
    return {"passed": ok, "rows": rows}


def check_gemm(device, quick: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from starquant_plugin.serving.quantization.triton_ops import sgat_quantize_triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    rows, ok = [], True
    g = torch.Generator().manual_seed(1)
    for tokens in (32,) if quick else (512, 4096):
        for name, (k, n) in (QUICK_LINEARS if quick else LLADA_8B_LINEARS).items():
            x = torch.randn(tokens, k, generator=g).to(dtype).to(device)
            states = (torch.rand(tokens, generator=g) < 0.5).long().to(device)
            shift, clip = (0.1 * torch.randn(2, k, generator=g)).to(device), torch.tensor([1.0, 0.9], device=device)
            weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
            weight_scale = (torch.rand(n, generator=g) / 127).to(device)
            dense = (weight.float() * weight_scale[:, None]).to(dtype)

            def sgat_int8(rotation_block=128):
                codes, scales = sgat_quantize_triton(x, states, shift, clip, rotation_block, 8)
                return (torch._int_mm(codes, weight.t()).float() * scales * weight_scale).to(dtype)

            def plain_int8():  # per-token absmax quantize, same kernel without the rotation
                return sgat_int8(rotation_block=0)

            codes, _ = sgat_quantize_triton(x, states, shift, clip, 128, 8)
            products = torch._int_mm(codes, weight.t())
            exact = bool(torch.equal(products.double(), codes.double() @ weight.double().t()))
            ok &= exact
            repeats = 1 if quick else 20
            int8_ms = 1e3 * timed(sgat_int8, device, repeats)
            eager_ms = 1e3 * timed(sgat_int8, device, repeats, eager=True)
            plain_ms = 1e3 * timed(plain_int8, device, repeats)
            gemm_ms = 1e3 * timed(lambda: torch._int_mm(codes, weight.t()), device, repeats)
            bf16_ms = 1e3 * timed(lambda: F.linear(x, dense), device, repeats)
            rows.append({"linear": name, "tokens": tokens, "in": k, "out": n, "int32_products_exact": exact,
                         "sgat_int8_ms": int8_ms, "sgat_int8_eager_ms": eager_ms, "plain_int8_ms": plain_ms, "sgat_overhead": int8_ms / plain_ms - 1,
                         "int_mm_ms": gemm_ms, f"{str(dtype)[6:]}_linear_ms": bf16_ms,
                         "speedup_vs_16bit": bf16_ms / int8_ms})
    return {"passed": ok, "rows": rows}


def check_eval(device, quick: bool, limit: int, checkpoints: list[Path]) -> dict:
    import torch

    from starquant_plugin import load
    from starquant_plugin.assets import SHIPPED_MODELS
    from starquant_plugin.evaluation import load_tasks
    from starquant_plugin.evaluation.runner import core_generate_fn, default_sampling, evaluate_examples

    models = [SHIPPED_MODELS["llada"]] if quick else [*SHIPPED_MODELS.values()]
    rows, ok = [], True
    for directory in [*models, *checkpoints]:
        name = str(directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory)
        try:
            examples = load_tasks(directory / "eval.jsonl")[:limit]
            scores = {}
            for where in dict.fromkeys(("cpu", device.type)):
                model, tokenizer = load(directory, device=where)
                mask = model.config.mask_token_id
                sampling = default_sampling(tokenizer, examples)
                started = time.perf_counter()
                with torch.no_grad():
                    result = evaluate_examples(core_generate_fn(model, tokenizer, mask), examples, sampling,
                                               batch_size=64, progress=False)
                scores[where] = (result.exact_match, time.perf_counter() - started)
                del model
        except Exception as error:  # one model that fails to load or run does not hide the others' rows
            ok = False
            rows.append({"model": name, "passed": False, "error": f"{type(error).__name__}: {error}"[:500]})
            continue
        passed = abs(scores[device.type][0] - scores["cpu"][0]) <= 0.01
        ok &= passed
        rows.append({"model": name, "n": len(examples), "exact_match_cpu": scores["cpu"][0],
                     f"exact_match_{device.type}": scores[device.type][0], "seconds_cpu": scores["cpu"][1],
                     f"seconds_{device.type}": scores[device.type][1], "passed": passed})
    return {"passed": ok, "rows": rows}


def machine(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = list(torch.cuda.get_device_capability(device))
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no GPU (use --device cpu to try the script)", file=sys.stderr)
        return 2
    limit = args.limit or (20 if args.quick else 200)
    report = {"machine": machine(device), "quick": args.quick}
    checks = {"ops": lambda: check_ops(device, args.quick), "gemm": lambda: check_gemm(device, args.quick),
              "eval": lambda: check_eval(device, args.quick, limit, args.checkpoint)}
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            report[name] = check()
        except Exception as error:  # one failing check does not hide the others' numbers
            report[name] = {"passed": False, "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()[-2000:]}
        report[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: {'passed' if report[name]['passed'] else 'FAILED'} ({report[name]['seconds']} s)")
        for row in report[name].get("rows", []):
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if "error" in report[name]:
            print("  " + report[name]["traceback"])
    report["passed"] = all(report[name]["passed"] for name in checks)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu check on {report['machine'].get('gpu', device)}: {'passed' if report['passed'] else 'FAILED'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
