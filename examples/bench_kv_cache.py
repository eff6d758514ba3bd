"""Approximate key/value cache (`cache: prefix | dual`) and threshold decoding on the shipped models.

For each model: exact match on the held-out set, denoising steps per answer and decoded tokens per
second, decoding one prompt at a time on vLLM (so a step count is the answer's own), for fixed-step
decoding without cache (the baseline), with each cache, threshold decoding, and both. The generation
is `--blocks` blocks just long enough for the longest answer, so a cache has blocks to work on.

    .venv/serve/bin/python examples/bench_kv_cache.py --limit 200 --json docs/bench/kv_cache_shipped.json
"""

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from starquant_plugin.assets import SHIPPED_MODELS
from starquant_plugin.bench.runner import decode_one_at_a_time, machine_info, versions
from starquant_plugin.evaluation import load_tasks
from starquant_plugin.serving import DiffusionLLM, DiffusionSamplingParams

RUNS = [("none", False), ("prefix", False), ("dual", False), ("none", True), ("dual", True)]  # (cache, threshold?)


def measure(model: Path, limit: int, blocks: int, threshold: float) -> list[dict]:
    examples = load_tasks(model / "eval.jsonl")[:limit]
    rows = []
    with DiffusionLLM(model) as llm:
        longest = max(len(llm.tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
        block_length = math.ceil(longest / blocks)
        gen_length = block_length * blocks
        fixed = DiffusionSamplingParams(gen_length=gen_length, steps=gen_length, block_length=block_length)
        for cache, thresholded in RUNS:
            sampling = replace(fixed, cache=cache, threshold=threshold if thresholded else None)
            name = f"{f'threshold {threshold}' if thresholded else 'fixed steps'}, {cache if cache != 'none' else 'no'} cache"
            steps, correct, seconds = decode_one_at_a_time(llm, examples, sampling)
            rows.append({"model": model.name, "run": name, "cache": cache, "threshold": sampling.threshold,
                         "gen_length": gen_length, "block_length": block_length, "n": len(examples),
                         "exact_match": correct / len(examples), "steps_per_answer": steps / len(examples),
                         "tokens_per_s": gen_length * len(examples) / seconds})
            print(f"{model.name}: {name}: exact match {100 * correct / len(examples):.2f}%, "
                  f"{steps / len(examples):.2f} steps/answer, {rows[-1]['tokens_per_s']:.1f} tok/s", flush=True)
    baseline = rows[0]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / baseline["tokens_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=Path, default=[SHIPPED_MODELS["llada"], SHIPPED_MODELS["dream"]])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [row for model in args.models for row in measure(model, args.limit, args.blocks, args.threshold)]
    print("\n| model | decoding | exact match % | steps/answer | tok/s | vs fixed, no cache |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['run']} | {100 * r['exact_match']:.2f} | {r['steps_per_answer']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(), "versions": versions(), "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
