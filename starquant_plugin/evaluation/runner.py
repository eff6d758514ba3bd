"""Exact-match evaluation of a diffusion LLM on a task file, with any decoding backend.

A backend enters as `generate_fn(prompts, sampling) -> continuations`: the core
(transformers) backend is `core_generate_fn(model, tokenizer, mask_token_id)`, the vLLM one
`DiffusionLLM.generate_texts` (`starquant_plugin.serving`).
"""

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from ..diffusion import DiffusionSamplingConfig, diffusion_generate, hf_logits_fn
from .tasks import TaskExample, exact_match

__all__ = ["EvaluationResult", "GenerateFn", "core_generate_fn", "default_sampling", "evaluate_examples", "generate_texts"]

GenerateFn = Callable[[list[str], DiffusionSamplingConfig], list[str]]


@dataclass
class EvaluationResult:
    exact_match: float
    n: int
    per_task: dict[str, float]
    settings: dict
    predictions: list[str]

    def to_json(self) -> dict:
        """The documented JSON shape (predictions are not part of it)."""
        return {"exact_match": self.exact_match, "n": self.n, "per_task": self.per_task, "settings": self.settings}


def default_sampling(
    tokenizer,
    examples: list[TaskExample],
    gen_length: int | None = None,
    steps: int | None = None,
    block_length: int | None = None,
    **options,
) -> DiffusionSamplingConfig:
    """Evaluation defaults: gen_length = the longest answer in tokens, steps = block_length = gen_length."""
    if gen_length is None:
        gen_length = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
        gen_length = max(gen_length, 1)
    return DiffusionSamplingConfig(gen_length=gen_length, steps=steps, block_length=block_length, **options)


def generate_texts(
    model, tokenizer, prompts: list[str], sampling: DiffusionSamplingConfig, mask_token_id: int
) -> list[str]:
    """Decode one batch of prompts; returns the continuations with special tokens skipped."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    if batch["input_ids"].shape[1] == 0:
        raise ValueError("empty prompt: the tokenizer produced no tokens")
    device = next(model.parameters()).device
    output = diffusion_generate(
        hf_logits_fn(model),
        batch["input_ids"].to(device),
        mask_token_id,
        sampling,
        attention_mask=batch["attention_mask"].to(device),
        logits_window=True,
    )
    return tokenizer.batch_decode(output.generated.cpu(), skip_special_tokens=True)


def core_generate_fn(model, tokenizer, mask_token_id: int) -> GenerateFn:
    """The core backend: decode with `model` (transformers) in this process."""

    def generate_fn(prompts: list[str], sampling: DiffusionSamplingConfig) -> list[str]:
        return generate_texts(model, tokenizer, prompts, sampling, mask_token_id)

    return generate_fn


def evaluate_examples(
    generate_fn: GenerateFn,
    examples: list[TaskExample],
    sampling: DiffusionSamplingConfig,
    batch_size: int = 32,
    extra_settings: dict | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Exact match overall and per task, decoding `batch_size` prompts at a time."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    started = time.perf_counter()
    predictions, correct = [], 0
    with tqdm(total=len(examples), desc="decoding", unit="ex", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            texts = generate_fn([e.prompt for e in chunk], sampling)
            predictions.extend(texts)
            correct += sum(exact_match(t, e.answer) for t, e in zip(texts, chunk))
            bar.update(len(chunk))
            bar.set_postfix(exact_match=f"{correct / len(predictions):.3f}")
    by_task = defaultdict(list)
    for prediction, example in zip(predictions, examples):
        by_task[example.task].append(exact_match(prediction, example.answer))
    settings = {
        **asdict(sampling),
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - started, 3),
        **(extra_settings or {}),
    }
    return EvaluationResult(
        exact_match=correct / len(examples),
        n=len(examples),
        per_task={task: sum(hits) / len(hits) for task, hits in sorted(by_task.items())},
        settings=settings,
        predictions=predictions,
    )
