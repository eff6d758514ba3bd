"""SGAT — State-Guided Activation Transformation (docs/method.md), in pure torch.

For one quantized input site with input `x` [tokens, dim] and token states `s`
(0 = unmasked, 1 = masked, from the input ids):

    x~ = (x - mu_s) D R                    shared smoothing D, rotation R (block-Hadamard)
    y  = Q_a(x~; clip_s) Q_w(W~)^T + beta_s,   W~ = W D^-1 R,   beta_s = mu_s W^T

Without quantization `y == x W^T` exactly. `D` is applied upstream (folded into the
preceding RMSNorm / producer weight) where possible, so the run-time input is already
`x D`; the site therefore stores its shift in the smoothed space, `shift_s = mu_s D`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..diffusion.masking import MASKED, UNMASKED
from .hadamard import block_hadamard
from .quantizers import fake_quantize_per_token

__all__ = [
    "SGATSite",
    "build_sgat_site",
    "search_state_clip",
    "sgat_compensation",
    "sgat_linear",
    "sgat_transform_input",
    "sgat_transform_weight",
    "state_centres",
    "smoothing_scales",
]

NUM_STATES = 2
DEFAULT_CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 .. 0.5


@dataclass
class SGATSite:
    """SGAT parameters of one input site, shared by every linear reading that input.

    Attributes:
        smoothing: [dim] diagonal D (activations are multiplied by it).
        shift: [2, dim] per-state centre in the smoothed space (`mu_s * D`), row = state.
        clip: [2] per-state clip ratio of the per-token activation quantizer, in (0, 1].
        rotation_block: block-Hadamard size; 0 disables the rotation.
    """

    smoothing: torch.Tensor
    shift: torch.Tensor
    clip: torch.Tensor
    rotation_block: int

    def __post_init__(self) -> None:
        dim = self.smoothing.shape[-1]
        if self.shift.shape != (NUM_STATES, dim):
            raise ValueError(f"SGATSite.shift has shape {tuple(self.shift.shape)}, expected {(NUM_STATES, dim)}")
        if self.clip.shape != (NUM_STATES,):
            raise ValueError(f"SGATSite.clip has shape {tuple(self.clip.shape)}, expected {(NUM_STATES,)}")
        if self.rotation_block and dim % self.rotation_block:
            raise ValueError(f"SGATSite.rotation_block={self.rotation_block} does not divide dim={dim}")


def _rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    return block_hadamard(x, block) if block else x


def state_centres(
    x: torch.Tensor, states: torch.Tensor, centre: Literal["mean", "midrange"] = "mean"
) -> torch.Tensor:
    """[2, dim] per-state channel centres of `x` [tokens, dim]; a state without tokens gets 0."""
    centres = torch.zeros(NUM_STATES, x.shape[-1], dtype=torch.float64, device=x.device)
    for state in (UNMASKED, MASKED):
        rows = x[states == state].double()
        if rows.shape[0] == 0:
            continue
        if centre == "mean":
            centres[state] = rows.mean(0)
        elif centre == "midrange":
            centres[state] = (rows.amax(0) + rows.amin(0)) / 2
        else:
            raise ValueError(f"centre must be 'mean' or 'midrange', got {centre!r}")
    return centres.to(x.dtype)


def smoothing_scales(
    activation_absmax: torch.Tensor, weight_absmax: torch.Tensor, strength: float
) -> torch.Tensor:
    """SmoothQuant's migration, D = w^(1-a) / x^a per channel (activations times D, weights over D)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"smoothing strength must be in [0, 1], got {strength}")
    act = activation_absmax.double().clamp(min=1e-5)
    weight = weight_absmax.double().clamp(min=1e-5)
    scales = weight.pow(1 - strength) / act.pow(strength)
    return (scales / scales.log().mean().exp()).to(activation_absmax.dtype)  # geometric mean 1


def sgat_transform_input(x_smoothed: torch.Tensor, states: torch.Tensor, site: SGATSite) -> torch.Tensor:
    """x~ = (x D - shift_s) R for run-time inputs that already carry D; states index the shift."""
    return _rotate(x_smoothed - site.shift.to(x_smoothed.dtype)[states], site.rotation_block)


def sgat_transform_weight(weight: torch.Tensor, site: SGATSite) -> torch.Tensor:
    """W~ = W D^-1 R for a torch weight [out, in] (rotation acts on the input dimension)."""
    return _rotate(weight / site.smoothing.to(weight.dtype), site.rotation_block)


def sgat_compensation(weight: torch.Tensor, site: SGATSite) -> torch.Tensor:
    """beta [2, out] = mu_s W^T = shift_s (W D^-1)^T, exact in full precision."""
    return (site.shift.double() @ (weight.double() / site.smoothing.double()).T).to(weight.dtype)


def sgat_linear(
    x_smoothed: torch.Tensor,
    states: torch.Tensor,
    site: SGATSite,
    transformed_weight: torch.Tensor,
    compensation: torch.Tensor,
    activation_bits: int | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = Q_a(x~; clip_s) W~^T + beta_s (+ bias), fake-quant reference of the SGAT linear.

    Args:
        x_smoothed: [..., in] inputs already multiplied by D; states: [...] token states.
        transformed_weight: [out, in] W~, quantized or not.
        compensation: [2, out] beta.
        activation_bits: None keeps activations in full precision.
    """
    transformed = sgat_transform_input(x_smoothed, states, site)
    if activation_bits is not None:
        clip = site.clip.to(transformed.dtype)[states][..., None]
        transformed = fake_quantize_per_token(transformed, activation_bits, clip)
    output = transformed @ transformed_weight.T.to(transformed.dtype) + compensation.to(transformed.dtype)[states]
    return output if bias is None else output + bias


def search_state_clip(
    transformed: torch.Tensor,
    states: torch.Tensor,
    transformed_weight: torch.Tensor,
    quantized_weight: torch.Tensor,
    activation_bits: int,
    grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
) -> torch.Tensor:
    """Per-state clip minimising || Q_a(x~; c) Q_w(W~)^T - x~ W~^T ||^2 over calibration tokens.

    Args:
        transformed: [tokens, in] x~; states: [tokens]; weights [out, in] (sites sharing an
            input pass their weights concatenated along `out`).
    Returns: [2] clip per state (1.0 for a state without tokens).
    """
    clip = torch.ones(NUM_STATES, dtype=transformed.dtype, device=transformed.device)
    for state in (UNMASKED, MASKED):
        rows = transformed[states == state]
        if rows.shape[0] == 0:
            continue
        target = rows @ transformed_weight.T
        errors = [
            (fake_quantize_per_token(rows, activation_bits, c) @ quantized_weight.T - target).pow(2).sum()
            for c in grid
        ]
        clip[state] = grid[int(torch.stack(errors).argmin())]
    return clip


def build_sgat_site(
    inputs: torch.Tensor,
    states: torch.Tensor,
    weights: list[torch.Tensor],
    rotation_block: int,
    smoothing_strength: float = 0.5,
    centre: Literal["mean", "midrange"] = "mean",
    per_state_shift: bool = True,
    activation_bits: int | None = None,
    quantize_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
) -> SGATSite:
    """Calibrate one site from its inputs (unsmoothed, [tokens, in]) and the weights reading them.

    `per_state_shift=False` (ablation) uses one shared centre; without `activation_bits`
    the clip stays 1.0 (ablation "without per-state clip" passes a one-point grid).
    """
    inputs = inputs.reshape(-1, inputs.shape[-1]).float()
    states = states.reshape(-1)
    if per_state_shift:
        centres = state_centres(inputs, states, centre)
    else:
        shared = state_centres(inputs, torch.zeros_like(states), centre)[UNMASKED]
        centres = shared.expand(NUM_STATES, -1).clone()
    stacked = torch.cat([w.float() for w in weights], 0)
    centred = inputs - centres[states]
    smoothing = (
        smoothing_scales(centred.abs().amax(0), stacked.abs().amax(0), smoothing_strength)
        if smoothing_strength > 0
        else torch.ones(inputs.shape[-1])
    )
    site = SGATSite(smoothing, centres * smoothing, torch.ones(NUM_STATES), rotation_block)
    if activation_bits is not None:
        transformed = sgat_transform_input(inputs * smoothing, states, site)
        transformed_weight = sgat_transform_weight(stacked, site)
        quantized = quantize_weight(transformed_weight) if quantize_weight else transformed_weight
        site.clip = search_state_clip(transformed, states, transformed_weight, quantized, activation_bits, clip_grid)
    return site
