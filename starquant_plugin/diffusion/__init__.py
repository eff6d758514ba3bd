"""Masked-diffusion decoding, likelihood and masking (pure torch)."""

from .likelihood import masked_nll, score_answer
from .masking import MASKED, UNMASKED, mask_positions, masked_state, spread_mask_ratios, token_states
from .sampler import (
    DiffusionOutput,
    DiffusionSamplingConfig,
    LogitsFn,
    TokenLogprobs,
    TrajectoryStep,
    diffusion_generate,
    diffusion_steps,
    hf_logits_fn,
    num_transfer_tokens,
)

__all__ = [
    "MASKED",
    "UNMASKED",
    "DiffusionOutput",
    "DiffusionSamplingConfig",
    "LogitsFn",
    "TokenLogprobs",
    "TrajectoryStep",
    "diffusion_generate",
    "diffusion_steps",
    "hf_logits_fn",
    "mask_positions",
    "masked_nll",
    "masked_state",
    "num_transfer_tokens",
    "score_answer",
    "spread_mask_ratios",
    "token_states",
]
