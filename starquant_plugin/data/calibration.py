"""Masked calibration simulation: the canvases a diffusion LLM sees while decoding.

Each record is a prompt/answer pair (answer tokens are masked) or plain text (all but the
first token maskable). Each record yields `samples_per_record` canvases with mask ratios
spread over (0, 1] (stratified), so every calibration set covers early (mostly masked)
and late (mostly decoded) denoising steps. llm-compressor takes the result as a dataset of
`input_ids` / `attention_mask` rows.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diffusion.masking import mask_positions, spread_mask_ratios
from .jsonl import read_jsonl_objects

__all__ = [
    "CalibrationRecord", "CalibrationTruncatedWarning", "load_calibration_records", "masked_calibration_samples",
]


class CalibrationTruncatedWarning(UserWarning):
    """Calibration records longer than the model's maximum length were cut to it."""


@dataclass(frozen=True)
class CalibrationRecord:
    """A prompt/answer pair, or plain `text` when `answer` is None."""

    prompt: str
    answer: str | None = None


def load_calibration_records(path: str | Path) -> list[CalibrationRecord]:
    """JSON lines of `{"prompt", "answer"}` or `{"text"}`; ValueError names file, line and field."""
    records = []
    for line_number, row in read_jsonl_objects(path, "calibration"):
        if isinstance(row.get("text"), str):
            records.append(CalibrationRecord(row["text"]))
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str):
            records.append(CalibrationRecord(row["prompt"], row["answer"]))
        else:
            raise ValueError(f"{path}:{line_number}: expected string fields 'prompt' and 'answer', or 'text'")
    if not records:
        raise ValueError(f"{path}: no calibration records")
    return records


def masked_calibration_samples(
    tokenizer,
    records: list[CalibrationRecord],
    mask_token_id: int,
    samples_per_record: int = 4,
    max_length: int | None = None,
    seed: int = 0,
) -> list[dict[str, list[int]]]:
    """Masked canvases `{"input_ids", "attention_mask"}` (unpadded), `samples_per_record` per record.

    Records longer than `max_length` tokens are cut to it, with one `CalibrationTruncatedWarning`.
    """
    generator = torch.Generator().manual_seed(seed)
    samples, truncated, longest = [], 0, 0
    for record in records:
        if record.answer is None:
            ids = tokenizer(record.prompt)["input_ids"]
            first_maskable = 1
        else:
            prompt = tokenizer(record.prompt)["input_ids"]
            ids = prompt + tokenizer(record.answer, add_special_tokens=False)["input_ids"]
            ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            first_maskable = len(prompt)
        if max_length is not None and len(ids) > max_length:
            truncated, longest = truncated + 1, max(longest, len(ids))
            ids = ids[:max_length]
        if len(ids) <= first_maskable:
            continue
        row = torch.tensor(ids).repeat(samples_per_record, 1)
        maskable = torch.zeros_like(row, dtype=torch.bool)
        maskable[:, first_maskable:] = True
        ratios = spread_mask_ratios(samples_per_record, generator)
        noisy, _ = mask_positions(row, maskable, ratios, mask_token_id, generator, exact=True)
        samples.extend({"input_ids": r.tolist(), "attention_mask": [1] * len(ids)} for r in noisy)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(records)} calibration records are longer than the model's maximum length "
            f"({max_length} tokens; the longest has {longest}) and were truncated to it",
            CalibrationTruncatedWarning, stacklevel=2,
        )
    if not samples:
        raise ValueError("no calibration sample has a maskable token (answers empty or truncated away)")
    return samples
