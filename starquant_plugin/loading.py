"""`starquant_plugin.load`: a checkpoint of a registered family, full precision or quantized, as one model.

The checkpoint is validated first (`checkpoint.validate`), then loaded by transformers
(compressed-tensors decompression to fake-quant weights), then the STaR-Quant tensors and
activation quantizers are attached (`checkpoint.load_quantized_into`). Whatever transformers
reports as missing, unexpected or mismatched and validation did not account for is an error.
`AutoModelForCausalLM.from_pretrained(dir)` / `AutoModel.from_pretrained(dir)` validate a local
checkpoint the same way, and load a quantized one by the same path (installed on
`DiffusionPreTrainedModel`, the base of every family's model class, on import).

This module sits above `models/` (the transformers model) and `checkpoint/` (the format).
"""

import warnings
from pathlib import Path

import torch
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from .checkpoint import ValidatedCheckpoint, load_quantized_into, validate_checkpoint
from .errors import InputError
from .models import DTYPES
from .models.base import DiffusionPreTrainedModel

__all__ = ["load", "load_model"]


def load(
    path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint of a registered family (LLaDA, Dream; single file or sharded; full precision,
    compressed-tensors or STaR-Quant) and its tokenizer, in eval mode. InputError naming the file and the tensor or
    field when the checkpoint is not what its config.json says.

    Args:
        dtype: `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`.
        device: where the model is put after loading.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    checkpoint = validate_checkpoint(path)
    return load_model(checkpoint, dtype, device), checkpoint.tokenizer


def load_model(
    checkpoint: ValidatedCheckpoint,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    model_class: type[DiffusionPreTrainedModel] | None = None,
) -> PreTrainedModel:
    """The model of a validated checkpoint (see `load`); `model_class` defaults to its family's."""
    model_class = model_class or checkpoint.family.model_class
    options = {"dtype": DTYPES[dtype], "use_safetensors": True, "output_loading_info": True}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    if checkpoint.quantized:
        from transformers.utils.quantization_config import CompressedTensorsConfig

        # Decompress into fake-quant weights; activation quantization is attached afterwards.
        options["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report is checked below, as errors
    try:
        with warnings.catch_warnings():
            # dequantize=True is deliberate; transformers warns that the checkpoint has its own config.
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model, info = model_class.from_pretrained_unrouted(checkpoint.directory, **options)
    finally:
        transformers_logging.set_verbosity(verbosity)
    _check_loading_info(checkpoint, info)
    model = model.to(device).eval()
    if checkpoint.quantized:
        load_quantized_into(model, checkpoint.directory, checkpoint.config)
    return model


def _check_loading_info(checkpoint: ValidatedCheckpoint, info: dict) -> None:
    """transformers' load report must be empty but for the tensors attached afterwards."""
    attached = set(checkpoint.starquant_shapes) | checkpoint.transform_tensors
    source = checkpoint.weights_path
    problems = [
        *(f"missing tensor {name}" for name in sorted(info["missing_keys"])),
        *(f"unexpected tensor {name}" for name in sorted(set(info["unexpected_keys"]) - attached)),
        *(f"tensor {name} has shape {tuple(got)}, expected {tuple(want)}"
          for name, got, want in sorted(info["mismatched_keys"])),
        *info["error_msgs"],
    ]
    if problems:
        raise InputError(f"{source}: transformers reports {problems[0]}" + (
            f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


# `from_pretrained` arguments that do not change what is loaded from a local directory (no family
# needs remote code), and those honoured at their default value only.
_IGNORED_ARGUMENTS = {
    "_from_auto", "_from_pipeline", "trust_remote_code", "cache_dir", "force_download", "local_files_only",
    "token", "proxies", "revision", "code_revision", "_commit_hash", "low_cpu_mem_usage",
}
_DEFAULT_ONLY_ARGUMENTS = {"subfolder": "", "use_safetensors": True, "variant": None, "weights_only": True}
# Config fields that differ between the directory's config and the one an Auto class passes in.
_VOLATILE_CONFIG_FIELDS = {"_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype",
                           "_attn_implementation_internal", "_attn_implementation_autoset", "attn_implementation"}


def _from_pretrained(model_class: type[DiffusionPreTrainedModel], path, *model_args, **kwargs):
    """`from_pretrained` of a family's model class for a local checkpoint directory: validated (config, files,
    tensors; not the tokenizer) before transformers loads a full-precision one as usual; a quantized
    one gives the same model as `load`, or an InputError naming `starquant_plugin.load` for
    arguments it cannot honour."""
    checkpoint = validate_checkpoint(Path(path) / (kwargs.get("subfolder") or ""), with_tokenizer=False)
    if not checkpoint.quantized:
        return model_class.from_pretrained_unrouted(path, *model_args, **kwargs)
    advice = f"load it with starquant_plugin.load({str(path)!r}, dtype=..., device=...)"
    if model_args:
        raise InputError(f"{path}: positional model arguments are not supported for a quantized checkpoint; {advice}")
    output_loading_info = kwargs.pop("output_loading_info", False)
    dtype = _dtype_name(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None), path, advice)
    device = _device(kwargs.pop("device_map", None), path, advice)
    config = kwargs.pop("config", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    if kwargs.pop("quantization_config", None) is not None:
        raise InputError(f"{path}: quantization_config cannot override a quantized checkpoint's own; {advice}")
    for name in _IGNORED_ARGUMENTS:
        kwargs.pop(name, None)
    if "_adapter_model_path" in (kwargs.pop("adapter_kwargs", None) or {}):
        raise InputError(f"{path}: PEFT adapters on a quantized checkpoint are not supported; {advice}")
    for name, default in _DEFAULT_ONLY_ARGUMENTS.items():
        value = kwargs.pop(name, default)
        if value not in (default, None):
            raise InputError(f"{path}: from_pretrained(..., {name}={value!r}) is not supported for a quantized "
                             f"checkpoint; {advice}")
    if kwargs:
        raise InputError(f"{path}: from_pretrained(..., {', '.join(sorted(kwargs))}=...) is not supported for a "
                         f"quantized checkpoint; {advice}")
    if config is not None:
        attn_implementation = attn_implementation or getattr(config, "_attn_implementation_internal", None)
        _check_same_config(config, checkpoint.model_config, path, advice)
    model = load_model(checkpoint, dtype, device, attn_implementation, model_class)
    if output_loading_info:
        return model, {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    return model


def _dtype_name(dtype, torch_dtype, path, advice: str) -> str:
    value = dtype if dtype is not None else torch_dtype
    if value is None:
        return "auto"
    names = {v: k for k, v in DTYPES.items()}
    name = value if isinstance(value, str) else names.get(value)
    if name not in DTYPES:
        raise InputError(f"{path}: dtype {value!r} is not supported (one of {sorted(DTYPES)}); {advice}")
    return name


def _device(device_map, path, advice: str) -> str | torch.device:
    """The one device of a `device_map`; dispatching over several devices or offloading is refused."""
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    if isinstance(device_map, torch.device):
        return device_map
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential", "disk"):
        try:
            return torch.device(device_map)
        except RuntimeError:
            pass
    raise InputError(f"{path}: device_map={device_map!r} (dispatch over devices or offloading) is not supported "
                     f"for a quantized checkpoint; {advice}")


def _check_same_config(config: PreTrainedConfig, stored: PreTrainedConfig, path, advice: str) -> None:
    """A config passed in (or built by an Auto class from extra keyword arguments) must be the
    directory's: the stored tensors fit that one only."""
    given, own = config.to_dict(), stored.to_dict()
    keys = (set(given) | set(own)) - _VOLATILE_CONFIG_FIELDS
    changed = sorted(k for k in keys if given.get(k) != own.get(k))
    if changed:
        raise InputError(f"{path}: a config that differs from its config.json ({', '.join(changed[:5])}) is not "
                         f"supported for a quantized checkpoint; {advice}")


DiffusionPreTrainedModel.checkpoint_loader = _from_pretrained
