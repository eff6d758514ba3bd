"""`starquant quantize`: calibrate a model of a registered family with a recipe and write a checkpoint."""

import json
import random
import time
import warnings
from contextlib import contextmanager, nullcontext
from functools import wraps
from pathlib import Path

import psutil
import yaml
from loguru import logger

from ..checkpoint import atomic_output_dir
from ..checkpoint.writer import check_output_dir, pack_low_bit_weights
from ..checkpoint.config import describe_validation_error
from ..data import load_calibration_records, masked_calibration_samples
from ..loading import load as load_checkpoint
from ..models import read_model_config
from .recipe_check import check_recipe
from .report import STAGES, QuantizeReport, stage

__all__ = ["TensorParallelWarning", "quantize", "tensor_parallel_sizes", "validate_recipe"]


def validate_recipe(recipe: Path):
    """Parse the recipe with llm-compressor before any model is loaded; ValueError names the problem.
    Returns the parsed recipe."""
    from llmcompressor.recipe import Recipe
    from pydantic import ValidationError

    if not recipe.is_file():
        raise ValueError(f"recipe not found: {recipe}")
    try:
        parsed = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{recipe}: not valid YAML ({error})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{recipe}: expected a mapping of stages, got {type(parsed).__name__}")
    try:
        instance = Recipe.create_instance(str(recipe))
    except ValidationError as error:
        raise ValueError(f"{recipe}: {describe_validation_error(error)}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{recipe}: {error}") from None
    if not instance.modifiers:
        raise ValueError(
            f"{recipe}: no modifiers found; recipes nest as <name>_stage: <group>_modifiers: ClassName: {{...}}"
        )
    return instance


def refuse_tied_embedding_quantization(instance, model, recipe: Path) -> None:
    """A weight-tied model reads its LM head from the embedding matrix: quantizing the embedding
    (weight-only, for a lookup) would silently quantize the head too, and vLLM cannot tie a
    packed embedding to its head. Refused with the module named."""
    from compressed_tensors.utils import match_named_modules

    if not getattr(model.config, "tie_word_embeddings", False):
        return
    embedding = model.get_input_embeddings()
    for modifier in instance.modifiers:
        if not hasattr(modifier, "resolved_targets"):
            continue
        for name, module in match_named_modules(model, modifier.resolved_targets, modifier.ignore):
            if module is embedding:
                raise ValueError(
                    f"{recipe}: {type(modifier).__name__} quantizes the embedding {name}, but this model ties its "
                    "LM head to it (tied word embeddings); quantize the embedding of untied models only"
                )


class TensorParallelWarning(UserWarning):
    """The written checkpoint cannot be served at some usual tensor-parallel sizes."""


def tensor_parallel_sizes(checkpoint: Path, sizes: tuple[int, ...] = (2, 4, 8)) -> dict[int, str | None]:
    """Per usual tensor-parallel size (up to the head count): None where vLLM can split the
    checkpoint over that many ranks, else why not (SGAT rotation block, TAC block or weight group
    larger than a rank's slice, heads); a named `TensorParallelWarning` for each size ruled out."""
    from ..checkpoint import validate_checkpoint
    from ..serving.servable import tensor_parallel_problem

    validated = validate_checkpoint(checkpoint, with_tokenizer=False)
    problems = {
        size: tensor_parallel_problem(validated, size) for size in sizes if size <= validated.family.heads(validated.model_config)[0]
    }
    for size, problem in problems.items():
        if problem is not None:
            warnings.warn(f"{checkpoint}: cannot be served with tensor_parallel_size={size}: {problem}",
                          TensorParallelWarning, stacklevel=2)
    return problems


def _install_save(model) -> None:
    """oneshot's save: llm-compressor's compressing `save_pretrained`, installed here (oneshot
    keeps a save marked `_overridden`), with low-bit weights packed first (`pack_low_bit_weights`)
    and the whole of it timed as the stage `save`."""
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    modify_save_pretrained(model)
    compressed_save = model.save_pretrained

    @wraps(compressed_save)
    def save_pretrained(*args, **kwargs):
        with stage("save"):
            packed = pack_low_bit_weights(model)
            if packed:
                logger.info(f"writing {len(packed)} linears' low-bit weights pack-quantized")
            return compressed_save(*args, **kwargs)

    save_pretrained._overridden = True
    model.save_pretrained = save_pretrained


def calibration_device(device: str):
    """The torch device `--device` names (None for `auto`); ValueError naming the value when it is
    not a device or not present here."""
    import torch

    if device == "auto":
        return None
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if target.type == "cuda" and (not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {device!r}: cpu or cuda[:N]")
    return target


@contextmanager
def _onload_to(target):
    """llm-compressor's pipelines calibrate each block on `get_main_device()` (the first
    accelerator, else the CPU); with a `target` they use that device instead."""
    if target is None:
        yield
        return
    from llmcompressor.pipelines.data_free import pipeline as data_free
    from llmcompressor.pipelines.sequential import pipeline as sequential

    import torch

    saved = [(module, module.get_main_device) for module in (sequential, data_free)]
    for module, _ in saved:
        module.get_main_device = lambda: target
    try:
        # The current CUDA device too: the per-stage report reads the peak memory of that one.
        with torch.cuda.device(target) if target.type == "cuda" else nullcontext():
            yield
    finally:
        for module, original in saved:
            module.get_main_device = original


def _stage_table(report: QuantizeReport, total: float, oneshot: float) -> list[dict]:
    """`STAGES` with their seconds and peak memory; the weight quantizer is oneshot's time outside
    the stages recorded within it, `other` what the total spends outside every stage."""
    recorded = report.stages
    whole = recorded.pop("oneshot")
    inside = sum(r.seconds for name, r in recorded.items() if name not in ("calibration data", "load model"))
    report.add("weight quantizer", max(oneshot - inside, 0.0), whole.peak_memory_bytes)
    report.add("other", max(total - sum(r.seconds for r in recorded.values()), 0.0), psutil.Process().memory_info().rss)
    return [
        {"name": name, "seconds": round(recorded[name].seconds, 3), "peak_memory_bytes": recorded[name].peak_memory_bytes}
        for name in STAGES if name in recorded
    ]


def quantize(
    model_dir: Path,
    recipe: Path,
    output: Path,
    dataset: Path | None = None,
    num_samples: int = 256,
    samples_per_record: int = 4,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str = "auto",
    device: str = "auto",
) -> dict:
    """Run oneshot and write `output` atomically; returns a summary (bits, sizes, seconds, and
    `core_only`: why vLLM could not serve the result, empty when it can; `tensor_parallel`: per
    tensor-parallel size 2, 4, 8 why vLLM could not split it, None where it can; `stages`: wall
    time and peak memory per stage (`report.STAGES`), also written to `output/quantize_report.json`).

    Everything that needs no model is checked before the model loads: the output directory (not
    the input, not existing unless `overwrite`), the recipe as a whole (`recipe_check.RULES`), the
    `device` (`auto`: llm-compressor's choice, the first accelerator, else the CPU; or `cpu`,
    `cuda[:N]`) each block is calibrated on (the model itself stays in CPU memory)."""
    from datasets import Dataset
    from llmcompressor import oneshot

    started = time.perf_counter()
    target = calibration_device(device)
    check_output_dir(output, [model_dir], overwrite)  # before minutes of loading
    config = read_model_config(model_dir)
    if "quantization_config" in config:
        raise ValueError(f"{model_dir} is already quantized; quantize a full-precision checkpoint")
    instance = validate_recipe(recipe)
    check_recipe(instance.modifiers, source=str(recipe))  # order and scheme rules that need no model
    if dataset is None:
        dataset = model_dir / "calibration.jsonl"
        if not dataset.is_file():
            raise ValueError(f"--dataset is required: {model_dir} ships no calibration.jsonl")
    if num_samples <= 0 or samples_per_record <= 0:
        raise ValueError(f"--num-samples and --samples-per-record must be positive, got {num_samples}, {samples_per_record}")
    report = QuantizeReport()
    with report.open():
        with report.stage("calibration data"):
            records = load_calibration_records(dataset)
            random.Random(seed).shuffle(records)
            records = records[: max(1, num_samples // samples_per_record)]
        with report.stage("load model"):
            model, tokenizer = load_checkpoint(model_dir, dtype=dtype)
        refuse_tied_embedding_quantization(instance, model, recipe)
        recipe_check = check_recipe(instance.modifiers, model, source=str(recipe))
        with report.stage("calibration data"):
            samples = masked_calibration_samples(
                tokenizer, records, config["mask_token_id"], samples_per_record,
                max_length=model.config.max_position_embeddings, seed=seed,
            )
        logger.info(f"calibrating on {len(samples)} masked canvases from {len(records)} records of {dataset}")
        _install_save(model)
        with atomic_output_dir(output, overwrite=overwrite) as staging:
            oneshot_started = time.perf_counter()
            with report.stage("oneshot"), _onload_to(target):
                oneshot(
                    model=model,
                    tokenizer=tokenizer,
                    dataset=Dataset.from_list(samples),
                    recipe=str(recipe),
                    num_calibration_samples=len(samples),
                    # Already shuffled with --seed; llm-compressor's own shuffle is unseeded, which made
                    # runs differ (SGAT statistics, GPTQ) for the same --seed.
                    shuffle_calibration_samples=False,
                    output_dir=str(staging),
                )
            for extra in ("eval.jsonl", "calibration.jsonl"):
                if (model_dir / extra).is_file():  # keep the shipped task sets next to the model
                    (staging / extra).write_bytes((model_dir / extra).read_bytes())
            stages = _stage_table(report, time.perf_counter() - started, time.perf_counter() - oneshot_started)
            (staging / "quantize_report.json").write_text(json.dumps({"stages": stages}, indent=2) + "\n")
    tensor_parallel = tensor_parallel_sizes(output)
    size = sum(p.stat().st_size for p in output.iterdir() if p.suffix == ".safetensors")
    original = sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix == ".safetensors")
    saved = read_model_config(output)
    groups = saved.get("quantization_config", {}).get("config_groups", {})
    bits = sorted({
        f"W{g['weights']['num_bits']}A{(g.get('input_activations') or {}).get('num_bits', 16)}"
        for g in groups.values() if g.get("weights")
    })
    formats = sorted({g["format"] for g in groups.values() if g.get("weights") and g.get("format")})
    return {
        "output": str(output),
        "schemes": bits,
        "formats": formats,  # compressed-tensors storage formats of the weight groups (pack-quantized: 4-bit packed)
        "starquant": sorted(k for k in ("sgat", "tac") if (saved.get("starquant_config") or {}).get(k)),
        "core_only": recipe_check.core_only,
        "tensor_parallel": tensor_parallel,
        "weights_bytes": size,
        "original_weights_bytes": original,
        "stages": stages,
        "seconds": round(time.perf_counter() - started, 1),
    }
