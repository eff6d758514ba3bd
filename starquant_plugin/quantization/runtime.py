"""Run SGAT and TAC inside a transformers diffusion LLM (fake-quant), from tensors on its modules.

A linear that is an SGAT site output carries buffers `sgat_shift` [2, in], `sgat_clip` [2],
`sgat_compensation` [2, out] and, where the smoothing could not be folded upstream,
`sgat_smoothing` [in]; its rotation block size is the attribute `sgat_rotation_block`.
An attention-output projection corrected by TAC carries `tac_matrices` [K, n, b, b],
`tac_offsets` [K, in] and the non-persistent `tac_bucket_edges` [K-1] (from the checkpoint's
config block; equal-width when absent). `attach_runtime` installs, per such linear, one pre-hook (TAC, then
the SGAT transform and, when activation quantization is on, the per-state clipped
per-token quantizer) and one forward hook (the per-state compensation). Token states come
from the blocks' `token_states` argument, so the same hooks serve llm-compressor's
calibration passes, the in-memory quantized model and a reloaded checkpoint.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..models.family import family_of
from .quantizers import fake_quantize_per_token
from .sgat import SGATSite, sgat_transform_input
from .tac import TACMap, apply_tac, mask_ratio_bucket, uniform_bucket_edges

__all__ = [
    "SGAT_BUFFERS", "TAC_BUFFERS", "TokenStateTracker", "attach_runtime", "detach_runtime", "activation_bits",
    "sequence_mask_ratio", "attach_tac_bucket_edges",
]

SGAT_BUFFERS = ("sgat_shift", "sgat_clip", "sgat_compensation")
TAC_BUFFERS = ("tac_matrices", "tac_offsets")
_HANDLES = "_starquant_runtime_handles"


def sequence_mask_ratio(token_states: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence [batch]: the fraction of its real (non-padding) tokens that are masked; TAC's
    bucket is chosen from it. `token_states` [batch, seq] (1 = masked), `real` [batch, seq] bool."""
    if real is None:
        real = torch.ones_like(token_states, dtype=torch.bool)
    return (token_states.bool() & real).sum(1) / real.sum(1).clamp(min=1)


@dataclass
class TokenStateTracker:
    """The token states [batch, seq] and per-sequence mask ratio [batch] of the block being run."""

    states: torch.Tensor | None = None
    mask_ratio: torch.Tensor | None = None

    def capture(self, block: nn.Module, args: tuple) -> None:
        hidden_states, attention_bias, _, token_states = (*args, None)[:4]
        self.states = token_states
        if token_states is None:
            self.mask_ratio = None
            return
        real = attention_bias[:, 0, 0, :] == 0 if attention_bias is not None else None
        self.mask_ratio = sequence_mask_ratio(token_states, real)


def activation_bits(module: nn.Module) -> int | None:
    """Bits of the per-state clipped activation quantizer the hook applies (None = off).

    Set by the STaR-Quant loader (`starquant_activation_bits`). Inside llm-compressor the
    hook instead saturates at the per-state clip and compressed-tensors' own per-token
    quantizer, which runs after it, quantizes.
    """
    return getattr(module, "starquant_activation_bits", None)


def compressed_tensors_quantizes_input(module: nn.Module) -> bool:
    """True when compressed-tensors' wrapped forward will quantize this linear's input."""
    scheme = getattr(module, "quantization_scheme", None)
    return (
        scheme is not None
        and scheme.input_activations is not None
        and getattr(module, "quantization_status", None) is not None
        and getattr(module, "quantization_enabled", True)
    )


def clip_per_token(x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Saturate each row at `clip` times its absmax, so a downstream absmax quantizer applies the clip."""
    limit = x.abs().amax(dim=-1, keepdim=True) * clip
    return torch.maximum(torch.minimum(x, limit), -limit)


def has_sgat(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in SGAT_BUFFERS)


def has_tac(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in TAC_BUFFERS)


def tac_bucket_edges(module: nn.Module) -> torch.Tensor | list[float]:
    """The mask-ratio bucket edges of a TAC site (equal-width when none were calibrated)."""
    edges = getattr(module, "tac_bucket_edges", None)
    return uniform_bucket_edges(module.tac_matrices.shape[0]) if edges is None else edges


def attach_tac_bucket_edges(module: nn.Module, edges: list[float]) -> None:
    """Register a TAC site's bucket edges beside its maps (non-persistent: config.json holds them)."""
    edges = torch.tensor(edges, dtype=torch.float32, device=module.weight.device)
    module.register_buffer("tac_bucket_edges", edges, persistent=False)


def sgat_site_of(module: nn.Module) -> SGATSite:
    """The SGATSite a linear reads its input through (online smoothing or ones)."""
    smoothing = getattr(module, "sgat_smoothing", None)
    if smoothing is None:
        smoothing = torch.ones_like(module.sgat_shift[0])
    return SGATSite(smoothing, module.sgat_shift, module.sgat_clip, int(module.sgat_rotation_block))


def _input_hook(tracker: TokenStateTracker):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        states = tracker.states
        if has_tac(module) and tracker.mask_ratio is not None:
            buckets = mask_ratio_bucket(tracker.mask_ratio, tac_bucket_edges(module))
            x = apply_tac(x, TACMap(module.tac_matrices, module.tac_offsets), buckets[:, None].expand(x.shape[:-1]))
        if has_sgat(module):
            if states is None:
                raise RuntimeError("SGAT needs token states: call the model with input_ids (not inputs_embeds)")
            smoothing = getattr(module, "sgat_smoothing", None)
            if smoothing is not None:
                x = x * smoothing.to(x.dtype)
            x = sgat_transform_input(x, states, sgat_site_of(module))
            clip = module.sgat_clip.to(x.dtype)[states][..., None]
            bits = activation_bits(module)
            if bits is not None:
                x = fake_quantize_per_token(x, bits, clip)
            elif compressed_tensors_quantizes_input(module):
                x = clip_per_token(x, clip)  # its per-token quantizer follows; the clip rides along
        elif activation_bits(module) is not None:
            x = fake_quantize_per_token(x, activation_bits(module))
        return (x, *args[1:])

    return hook


def _output_hook(tracker: TokenStateTracker):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + module.sgat_compensation.to(output.dtype)[tracker.states]

    return hook


def detach_runtime(model: nn.Module) -> None:
    for handle in getattr(model, _HANDLES, []):
        handle.remove()
    setattr(model, _HANDLES, [])


def attach_runtime(model: nn.Module) -> int:
    """(Re)install the hooks on a model of a registered family (`models/family.py`); returns how many linears got one (SGAT, TAC or
    plain per-token activation quantization)."""
    detach_runtime(model)
    tracker = TokenStateTracker()
    handles, count = [], 0
    for block in family_of(model.config).block_list(model):
        handles.append(block.register_forward_pre_hook(tracker.capture))
        for module in block.modules():
            if not isinstance(module, nn.Linear):
                continue
            if not (has_sgat(module) or has_tac(module) or activation_bits(module) is not None):
                continue
            handles.append(module.register_forward_pre_hook(_input_hook(tracker)))
            if has_sgat(module):
                handles.append(module.register_forward_hook(_output_hook(tracker)))
            count += 1
    setattr(model, _HANDLES, handles)
    return count
