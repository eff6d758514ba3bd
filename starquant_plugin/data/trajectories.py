"""Denoising trajectories of a model, as calibration inputs (TAC fits on the quantized model's own)."""

import torch

from ..diffusion import DiffusionSamplingConfig, LogitsFn, diffusion_generate

__all__ = ["LOGITS_BUDGET_BYTES", "rows_per_batch", "trajectory_canvases"]


# Working memory a batch of canvases may take for its logits (and their float64 probabilities).
LOGITS_BUDGET_BYTES = 256 * 2**20


def rows_per_batch(length: int, vocab_size: int | None, bytes_per_value: int = 4,
                   budget: int = LOGITS_BUDGET_BYTES) -> int:
    """How many canvases of `length` tokens to run as one batch so that their logits
    (`bytes_per_value` per vocabulary entry) stay under `budget`; 1 without a vocabulary size."""
    if not vocab_size:
        return 1
    return max(1, budget // (length * vocab_size * bytes_per_value))


@torch.no_grad()
def trajectory_canvases(
    logits_fn: LogitsFn, rows: list[torch.Tensor], mask_token_id: int, max_rows: int | None = None,
    vocab_size: int | None = None,
) -> list[torch.Tensor]:
    """Every step's input canvas [1, seq] of a greedy low-confidence decode of each row, row by
    row in the order given.

    A row is a calibration canvas: the tokens before its first mask are the prompt and the
    rest is regenerated (one token per step), so the canvases cover all mask ratios with the
    errors the model itself makes along the way. Rows without a mask are skipped. Rows with
    the same prompt length and length decode together as one batch (they commit one token per
    step each, so they stay in step); with `vocab_size`, batches are bounded so that their
    float64 probabilities stay under `LOGITS_BUDGET_BYTES` (without it, one row at a time).
    """
    rows = rows[:max_rows]
    per_row: list[list[torch.Tensor]] = [[] for _ in rows]
    shapes: dict[tuple[int, int], list[int]] = {}
    for index, row in enumerate(rows):
        masked = (row == mask_token_id).nonzero()
        if masked.numel() == 0 or masked[0, 0] == 0:
            continue
        shapes.setdefault((int(masked[0, 0]), row.numel()), []).append(index)
    for (prompt_length, length), members in shapes.items():
        config = DiffusionSamplingConfig(gen_length=length - prompt_length)
        size = rows_per_batch(length, vocab_size, bytes_per_value=8)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]

            def keep(step, chunk=chunk):
                for index, canvas in zip(chunk, step.input_ids):
                    per_row[index].append(canvas[None])

            prompts = torch.stack([rows[index][:prompt_length] for index in chunk])
            diffusion_generate(logits_fn, prompts, mask_token_id, config, trajectory_hook=keep, logits_window=True)
    return [canvas for canvases in per_row for canvas in canvases]
