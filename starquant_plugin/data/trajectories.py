"""Denoising trajectories of a model, as calibration inputs (TAC fits on the quantized model's own)."""

import torch

from ..diffusion import DiffusionSamplingConfig, LogitsFn, diffusion_generate

__all__ = ["trajectory_canvases"]


@torch.no_grad()
def trajectory_canvases(
    logits_fn: LogitsFn, rows: list[torch.Tensor], mask_token_id: int, max_rows: int | None = None
) -> list[torch.Tensor]:
    """Every step's input canvas [1, seq] of a greedy low-confidence decode of each row.

    A row is a calibration canvas: the tokens before its first mask are the prompt and the
    rest is regenerated (one token per step), so the canvases cover all mask ratios with the
    errors the model itself makes along the way. Rows without a mask are skipped.
    """
    canvases = []
    for row in rows[:max_rows]:
        masked = (row == mask_token_id).nonzero()
        if masked.numel() == 0 or masked[0, 0] == 0:
            continue
        prompt_length = int(masked[0, 0])
        config = DiffusionSamplingConfig(gen_length=row.numel() - prompt_length)
        diffusion_generate(
            logits_fn, row[None, :prompt_length], mask_token_id, config,
            trajectory_hook=lambda step: canvases.append(step.input_ids), logits_window=True,
        )
    return canvases
