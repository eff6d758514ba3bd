"""Masking utilities: token states and the forward (noising) process of masked diffusion.

A token is in the *masked* state when its id is the mask token and *unmasked* otherwise
(prompt, padding and already-decoded tokens). States come from input ids alone, so any
consumer (SGAT, calibration, vLLM) can derive them without model changes.
"""

import torch

__all__ = ["MASKED", "UNMASKED", "masked_state", "token_states", "spread_mask_ratios", "mask_positions"]

UNMASKED = 0
MASKED = 1


def masked_state(input_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Bool tensor, same shape as `input_ids`: True where the token is the mask token."""
    return input_ids == mask_token_id


def token_states(input_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Integer state per token (`MASKED`=1 / `UNMASKED`=0), usable as an index into per-state tables."""
    return masked_state(input_ids, mask_token_id).long()


def spread_mask_ratios(count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` mask ratios spread evenly over (0, 1] with one random offset (stratified sampling).

    Stratification covers every noise level even for small `count`, as in LLaDA's
    low-variance likelihood estimator.
    """
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    offset = torch.rand((), generator=generator, dtype=torch.float64)
    return ((torch.arange(count, dtype=torch.float64) + offset) / count).clamp(min=1e-6, max=1.0)


def mask_positions(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    ratios: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    exact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a fraction of the maskable positions of each row.

    Args:
        input_ids: [batch, seq] clean tokens.
        maskable: [batch, seq] bool, positions that may be masked (answer tokens).
        ratios: [batch] mask ratio per row in (0, 1].
        exact: mask exactly `max(1, round(ratio * n))` of the `n` maskable tokens of a row
            (LLaDA's evaluation process); otherwise mask each independently with
            probability `ratio` (LLaDA's training process).
    Returns:
        (noisy_ids, is_masked): noisy ids and the bool mask of positions replaced.
    """
    ratios = ratios.to(torch.float64).reshape(-1, 1)
    scores = torch.rand(input_ids.shape, generator=generator, dtype=torch.float64)
    if exact:
        counts = (ratios.squeeze(1) * maskable.sum(1)).round().clamp(min=1).long()
        scores = scores.masked_fill(~maskable, 2.0)
        order = scores.argsort(dim=1).argsort(dim=1)
        is_masked = (order < counts[:, None]) & maskable
    else:
        is_masked = (scores < ratios) & maskable
    return torch.where(is_masked, torch.full_like(input_ids, mask_token_id), input_ids), is_masked
