"""Attach a checkpoint's STaR-Quant tensors to a (decompressed) model of a registered family, validating everything."""

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from torch import nn

from ..errors import InputError
from ..quantization.hadamard import rotation_block_for
from ..quantization.runtime import attach_runtime, attach_tac_bucket_edges
from .config import StarQuantConfig, describe_validation_error
from .schema import STARQUANT_SUFFIXES, starquant_tensor_shapes

__all__ = [
    "apply_online_transforms", "load_quantized_into", "online_transform_config", "parse_starquant_config",
    "read_starquant_tensors", "transform_suffixes",
]



def parse_starquant_config(config: dict, source: Path) -> StarQuantConfig | None:
    block = config.get("starquant_config")
    if block is None:
        return None
    try:
        parsed = StarQuantConfig.model_validate(block)
    except ValidationError as error:
        raise InputError(f"{source}: starquant_config.{describe_validation_error(error)}") from None
    if parsed.mask_token_id != config.get("mask_token_id"):
        raise InputError(
            f"{source}: starquant_config.mask_token_id={parsed.mask_token_id} does not match the model's "
            f"mask_token_id={config.get('mask_token_id')}"
        )
    return parsed


def read_tensors(directory: Path, wanted) -> dict[str, torch.Tensor]:
    """The tensors whose names satisfy `wanted(name)` in a single-file or sharded safetensors checkpoint."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(directory / name, "pt") as f:
            for key in f.keys():
                if wanted(key):
                    tensors[key] = f.get_tensor(key)
    return tensors


def read_starquant_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All STaR-Quant tensors of a single-file or sharded safetensors checkpoint."""
    return read_tensors(directory, lambda key: key.rsplit(".", 1)[-1] in STARQUANT_SUFFIXES)


def online_transform_config(config: dict, source: Path):
    """The online part of a checkpoint's compressed-tensors `transform_config` (as written by
    llm-compressor's QuIP/SpinQuant modifiers), or None. Weight-side transforms are already fused
    into the saved weights; transformers applies neither, so the online ones are ours to attach."""
    block = (config.get("quantization_config") or {}).get("transform_config") or {}
    if not block.get("config_groups"):
        return None
    from compressed_tensors.transform import TransformConfig

    try:
        full = TransformConfig.model_validate(block)
    except ValidationError as error:
        raise InputError(f"{source}: quantization_config.transform_config.{describe_validation_error(error)}") from None
    online = {}
    for name, scheme in full.config_groups.items():
        args = [a for a in scheme.apply if a.is_online()]
        unsupported = [str(a.location) for a in args if _location(a) in ("q_attn", "k_cache")]
        if unsupported:
            raise InputError(
                f"{source}: transform_config.config_groups.{name}: attention transforms {unsupported} are not supported"
            )
        if args:
            online[name] = scheme.model_copy(update={"apply": args})
    return TransformConfig(config_groups=online) if online else None


def _location(args) -> str:
    return str(getattr(args.location, "value", args.location))


def transform_suffixes(online) -> tuple[str, ...]:
    """Name parts (`.v_input.`) of the stored matrices of online transforms."""
    return tuple(f".{name}_{_location(a)}." for name, scheme in online.config_groups.items() for a in scheme.apply)


def apply_online_transforms(model: nn.Module, directory: Path, config: dict) -> bool:
    """Re-attach a checkpoint's online rotations (`online_transform_config`), with the stored
    matrices. Without it a rotated checkpoint computes garbage."""
    online = online_transform_config(config, directory / "config.json")
    if online is None:
        return False
    from compressed_tensors.transform import apply_transform_config

    apply_transform_config(model, online)
    parameters = dict(model.named_parameters())
    suffixes = transform_suffixes(online)
    for key, tensor in read_tensors(directory, lambda k: any(suffix in k for suffix in suffixes)).items():
        if key in parameters:  # one stored matrix per width; the parameter is shared by every layer of it
            if parameters[key].shape != tensor.shape:
                raise InputError(f"{directory}: transform tensor {key} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(parameters[key].shape)}")
            parameters[key].data.copy_(tensor.to(parameters[key].dtype))
    return True


def _expect(tensors: dict, name: str, shape: tuple, source: Path) -> torch.Tensor:
    if name not in tensors:
        raise InputError(f"{source}: missing STaR-Quant tensor {name}")
    tensor = tensors.pop(name)
    if tuple(tensor.shape) != shape:
        raise InputError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _attach(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module.register_buffer(name, tensor.to(device=module.weight.device, dtype=module.weight.dtype))


def load_quantized_into(model: nn.Module, directory: str | Path, config: dict) -> StarQuantConfig | None:
    """Register SGAT/TAC tensors, set per-token activation quantization from the
    compressed-tensors schemes, and attach the runtime. Returns the parsed block."""
    directory = Path(directory)
    block = parse_starquant_config(config, directory / "config.json")
    tensors = read_starquant_tensors(directory)
    modules = dict(model.named_modules())
    for name, shape in starquant_tensor_shapes(model, block, directory).items():
        module_name, buffer = name.rsplit(".", 1)
        module = modules[module_name]
        _attach(module, buffer, _expect(tensors, name, shape, directory))
        if buffer == "sgat_shift":
            module.sgat_rotation_block = rotation_block_for(module.in_features, block.sgat.rotation_block_size)
        if buffer == "tac_matrices":
            attach_tac_bucket_edges(module, block.tac.edges)
    if tensors:
        raise InputError(
            f"{directory}: STaR-Quant tensors the starquant_config does not account for: {sorted(tensors)[:3]}"
        )
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        activations = getattr(scheme, "input_activations", None)
        if activations is None:
            continue
        if not activations.dynamic or str(activations.strategy.value if hasattr(activations.strategy, "value") else activations.strategy) != "token":
            raise InputError(
                f"{directory}: {name} uses {activations.strategy} activation quantization "
                f"(dynamic={activations.dynamic}); only dynamic per-token activations are supported"
            )
        module.starquant_activation_bits = activations.num_bits
    apply_online_transforms(model, directory, config)  # its input hooks run before the runtime's quantizers
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            # compressed-tensors keeps a fake-quant forward wrapper on decompressed linears that
            # would quantize the input a second time; our hooks own activation quantization.
            module.quantization_enabled = False
    attach_runtime(model)
    return block
