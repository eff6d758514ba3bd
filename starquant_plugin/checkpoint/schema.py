"""The STaR-Quant tensors of a checkpoint: their names and shapes, from the model family and the
`starquant_config` block (docs/checkpoint-format.md, "Tensors"). The writer stores them as
buffers on the modules; the loader, the validator and the vLLM method read this schema."""

from pathlib import Path

from torch import nn

from ..errors import InputError
from ..models.family import family_of
from ..quantization.runtime import SGAT_BUFFERS, TAC_BUFFERS
from .config import StarQuantConfig

__all__ = ["STARQUANT_SUFFIXES", "starquant_tensor_shapes"]

STARQUANT_SUFFIXES = (*SGAT_BUFFERS, "sgat_smoothing", *TAC_BUFFERS)


def starquant_tensor_shapes(
    model: nn.Module, block: StarQuantConfig | None, source: Path
) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every STaR-Quant tensor a checkpoint with `block` holds for `model` (of a
    registered family, on any device, meta included); docs/checkpoint-format.md."""
    shapes: dict[str, tuple[int, ...]] = {}
    if block is None:
        return shapes
    prefix = {module: name for name, module in model.named_modules()}
    family = family_of(model.config)
    blocks = family.block_list(model)
    if block.sgat is not None:
        online = set(block.sgat.online_sites(model.config))
        for layer in blocks:
            for site_name, spec in family.sgat_sites.items():
                for linear in (layer.get_submodule(name) for name in spec.linears):
                    name, width, out = prefix[linear], linear.in_features, linear.out_features
                    shapes[f"{name}.sgat_shift"] = (2, width)
                    shapes[f"{name}.sgat_clip"] = (2,)
                    shapes[f"{name}.sgat_compensation"] = (2, out)
                    if site_name in online:  # nothing upstream absorbed D: it is applied online
                        shapes[f"{name}.sgat_smoothing"] = (width,)
    if block.tac is not None:
        b, buckets = block.tac.block_size, block.tac.num_buckets
        for layer in blocks:
            target = layer.get_submodule(family.tac_target)
            name, width = prefix[target], target.in_features
            if width % b:
                raise InputError(f"{source}: starquant_config.tac.block_size={b} does not divide {name} width {width}")
            shapes[f"{name}.tac_matrices"] = (buckets, width // b, b, b)
            shapes[f"{name}.tac_offsets"] = (buckets, width)
    return shapes
