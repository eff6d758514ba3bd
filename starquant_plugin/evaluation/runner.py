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
from ..errors import InputError
from .tasks import TaskExample, exact_match

__all__ = [
    "EvaluationResult",
    "GenerateFn",
    "core_generate_fn",
    "default_sampling",
    "encode_prompt",
    "evaluate_examples",
    "generate_texts",
]

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


def _describe_character(text: str, position: int) -> str:
    character = text[position]
    return f"character {character!r} (U+{ord(character):04X}) at position {position}"


def _first_unencodable_character(tokenizer, text: str) -> int | None:
    """Position of the first character the tokenizer cannot encode on its own (it raises, or
    maps it to its unknown token); None when every character alone is fine."""
    unk = tokenizer.unk_token_id
    for character in dict.fromkeys(text):  # each distinct character once, in order of appearance
        try:
            ids = tokenizer(character, add_special_tokens=False)["input_ids"]
        except Exception:
            return text.index(character)
        if unk is not None and unk in ids:
            return text.index(character)
    return None


def _token_position(tokenizer, text: str, token_index: int) -> str:
    """`at position N` (characters) of a token when the tokenizer gives offsets, else `at token N`."""
    try:
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        return f"at position {offsets[token_index][0]}"
    except Exception:  # a slow tokenizer has no offsets
        return f"at token {token_index}"


def encode_prompt(
    tokenizer, text: str, mask_token_id: int | None, name: str = "prompt", add_special_tokens: bool = True
) -> list[int]:
    """`text`'s token ids, or InputError naming `name` and the character when the model cannot
    read it as written: text that is not valid Unicode (a lone surrogate), a character the
    tokenizer has no token for (it raises, or gives its unknown token for non-empty text), or
    the mask token (`mask_token_id`; the sampler would fill it in instead of reading it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(
            f"{name}: character at position {error.start} is a lone surrogate (U+{ord(text[error.start]):04X}), "
            "not valid Unicode text"
        ) from None
    try:
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    except Exception as error:  # tokenizers raise a bare Exception for a character missing from the vocabulary
        position = _first_unencodable_character(tokenizer, text)
        if position is None:
            raise InputError(f"{name}: the tokenizer cannot encode it ({type(error).__name__}: {error})") from None
        raise InputError(f"{name}: {_describe_character(text, position)} is not in the model's vocabulary") from None
    unk = tokenizer.unk_token_id
    if text and unk is not None and unk in ids:
        position = _first_unencodable_character(tokenizer, text)
        where = (_describe_character(text, position) if position is not None
                 else f"the text {_token_position(tokenizer, text, ids.index(unk))}")
        raise InputError(f"{name}: {where} is not in the model's vocabulary (it maps to {tokenizer.unk_token!r})")
    if mask_token_id is not None and mask_token_id in ids:
        raise InputError(
            f"{name}: contains the mask token {tokenizer.convert_ids_to_tokens(mask_token_id)!r} (id {mask_token_id}) "
            f"{_token_position(tokenizer, text, ids.index(mask_token_id))}: prompts cannot contain the mask token"
        )
    return ids


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
        gen_length = max(
            len(encode_prompt(tokenizer, e.answer, None, f"example {i + 1}: answer", add_special_tokens=False))
            for i, e in enumerate(examples)
        )
        gen_length = max(gen_length, 1)
    return DiffusionSamplingConfig(gen_length=gen_length, steps=steps, block_length=block_length, **options)


def generate_texts(
    model, tokenizer, prompts: list[str], sampling: DiffusionSamplingConfig, mask_token_id: int,
    add_special_tokens: bool = True,
) -> list[str]:
    """Decode one batch of prompts; returns the continuations with special tokens skipped.
    `add_special_tokens=False` for prompts that hold them already (rendered chat templates).

    InputError naming the prompt when one cannot be read as written (`encode_prompt`) or its
    canvas exceeds the model's `max_sequence_length`.
    """
    limit = getattr(model.config, "max_sequence_length", None)
    for index, prompt in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt {index}"
        length = len(encode_prompt(tokenizer, prompt, mask_token_id, name, add_special_tokens))
        if limit is not None and length + sampling.gen_length > limit:
            raise InputError(
                f"{name}: {length} prompt tokens + gen_length {sampling.gen_length} exceeds "
                f"max_sequence_length={limit}"
            )
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
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
