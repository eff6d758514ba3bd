"""What every diffusion LLM class of the package shares: `from_pretrained` routed through the
checkpoint loader for local directories (validation first; quantized checkpoints with their
STaR-Quant tensors)."""

import os
from collections.abc import Callable
from typing import ClassVar

from transformers import PreTrainedModel

from ..errors import InputError

__all__ = ["DiffusionPreTrainedModel"]


def _is_local_checkpoint(path) -> bool:
    """A local directory with a config.json (hub ids and config objects go to transformers as they are)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(os.fspath(path), "config.json"))


class DiffusionPreTrainedModel(PreTrainedModel):
    """`PreTrainedModel` whose `from_pretrained` of a local directory goes through `checkpoint_loader`."""

    # Installed by `starquant_plugin.loading`, the layer above models/ and checkpoint/:
    # `loader(cls, path, *model_args, **kwargs)` validates a local checkpoint directory and loads a
    # quantized one with its STaR-Quant tensors and activation quantizers (transformers drops them).
    checkpoint_loader: ClassVar[Callable | None] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, through `checkpoint_loader` for a local checkpoint
        directory: validated first, and a quantized one loaded as `starquant_plugin.load` does, so
        that `AutoModelForCausalLM.from_pretrained(dir)` gives the same model."""
        loader = DiffusionPreTrainedModel.checkpoint_loader
        if loader is not None and _is_local_checkpoint(pretrained_model_name_or_path):
            return loader(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if getattr(model.config, "starquant_config", None) is not None:
            # Not a local directory (e.g. a hub id): transformers dropped its STaR-Quant tensors.
            raise InputError(
                f"{pretrained_model_name_or_path}: a STaR-Quant checkpoint loads only from a local directory: "
                "download it, then use starquant_plugin.load(directory)"
            )
        return loaded

    @classmethod
    def from_pretrained_unrouted(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' own `from_pretrained` (what `checkpoint_loader` calls inside)."""
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
