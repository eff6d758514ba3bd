"""Write a calibrated SGAT site into a model: fold the smoothing upstream, transform the weights,
and store the per-state tensors on the linears (read back by `runtime.attach_runtime`)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .sgat import SGATSite, sgat_compensation, sgat_transform_weight

__all__ = ["SGATSiteModules", "apply_sgat_site", "write_in_place"]

ParameterWriter = Callable[[nn.Module, str, torch.Tensor], None]


def write_in_place(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Default parameter writer; llm-compressor passes its offload-safe `update_offload_parameter`."""
    getattr(module, name).data.copy_(value)


@dataclass
class SGATSiteModules:
    """The modules of one input site.

    Attributes:
        linears: the linears reading the site input (they share D, R, shift and clip).
        fold_into: the module producing the input, whose output channels absorb D: an RMSNorm
            (`weight` [in]) or a Linear (rows of `weight`, and its compensation); None applies
            D on line.
    """

    linears: list[nn.Linear]
    fold_into: nn.Module | None = None


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._buffers:
        module._buffers[name] = value
    else:
        module.register_buffer(name, value)


@torch.no_grad()
def apply_sgat_site(modules: SGATSiteModules, site: SGATSite, write: ParameterWriter = write_in_place) -> None:
    """Apply `site` to its modules so that, with `attach_runtime`, the model computes the same
    function in full precision and the SGAT-quantized one when quantizers are on."""
    smoothing = site.smoothing
    producer = modules.fold_into
    for linear in modules.linears:
        if producer is None:
            _set_buffer(linear, "sgat_smoothing", smoothing.to(linear.weight.dtype).clone())
        else:
            linear._sgat_folded_smoothing = smoothing.clone()  # in memory only: TAC fits in this space
    if isinstance(producer, nn.Linear):
        write(producer, "weight", producer.weight * smoothing.to(producer.weight.dtype)[:, None])
        if producer.bias is not None:
            write(producer, "bias", producer.bias * smoothing.to(producer.bias.dtype))
        if hasattr(producer, "sgat_compensation"):
            _set_buffer(producer, "sgat_compensation", producer.sgat_compensation * smoothing.to(producer.sgat_compensation.dtype))
    elif producer is not None:
        write(producer, "weight", producer.weight * smoothing.to(producer.weight.dtype))
    for linear in modules.linears:
        weight = linear.weight.float()
        dtype = linear.weight.dtype
        _set_buffer(linear, "sgat_compensation", sgat_compensation(weight, site).to(dtype))
        write(linear, "weight", sgat_transform_weight(weight, site).to(dtype))
        _set_buffer(linear, "sgat_shift", site.shift.to(dtype).clone())
        _set_buffer(linear, "sgat_clip", site.clip.to(dtype).clone())
        linear.sgat_rotation_block = site.rotation_block
