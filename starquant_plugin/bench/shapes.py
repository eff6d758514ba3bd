"""Checkpoints for the benchmark: the shipped model, or random weights at a real model's shapes.

`--shape llada-8b --layers N` times LLaDA-8B's real layer shapes (hidden 4096, MLP 12288, 32
heads, the 126,464-row vocabulary) with N blocks, `--shape dream-7b` Dream-7B's (hidden 3584,
MLP 18944, 28 heads over 4 KV heads, 152,064 rows), so one CPU can time them. Weights are
random (timing does not depend on their values) and saved in bf16 with a character tokenizer
that carries the config's special ids, so the same recipes and calibration data apply.
"""

import json
from pathlib import Path

import torch
import transformers

from ..assets import SHIPPED_MODEL

__all__ = ["SHAPES", "SHAPE_CONFIGS", "LLADA_8B_CONFIG", "base_checkpoint", "full_depth", "write_random_checkpoint"]

# The public config.json of each real-model shape (random weights are written at its shapes).
SHAPE_CONFIGS = {
    "llada-8b": Path(__file__).with_name("llada-8b-config.json"),
    "dream-7b": Path(__file__).with_name("dream-7b-config.json"),
}
SHAPES = ("shipped", *SHAPE_CONFIGS)
LLADA_8B_CONFIG = SHAPE_CONFIGS["llada-8b"]
# Characters of the shipped model's calibration data, so its calibration set tokenizes.
_CHARACTERS = "0123456789+-= abcdefghijklmnopqrstuvwxyz"
_COMPLETE = ".complete"


def build_config(config: dict):
    """The family config object of a config.json dict."""
    from ..models.family import family_of

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    return family_of(config).config_class(**fields)


def full_depth(config: dict) -> int:
    """Blocks of the model a config.json describes (whatever the family calls the field)."""
    return build_config(config).num_hidden_layers


def write_random_checkpoint(directory: Path, config: dict, layers: int, seed: int = 0, dtype=torch.bfloat16) -> Path:
    """A checkpoint of `config`'s family with `layers` blocks of its shapes and random weights
    (tensor names and shapes from the family's model built on the meta device).

    Written to a temporary name and renamed when complete, so an interrupted run leaves
    nothing that looks like a checkpoint.
    """
    from safetensors.torch import save_file

    from ..models.char_tokenizer import build_char_tokenizer
    from ..models.family import family_of

    model_config = build_config(config)
    depth_key = model_config.attribute_map.get("num_hidden_layers", "num_hidden_layers")
    config = dict(config, **{depth_key: layers}, dtype=str(dtype).removeprefix("torch."))
    config.pop("auto_map", None)  # served and loaded natively, no remote code
    config.pop("torch_dtype", None)
    # As save_pretrained stamps it: without it, transformers takes any local tokenizer for one of
    # Mistral's with a broken regex and warns on every load.
    config["transformers_version"] = transformers.__version__
    model_config.num_hidden_layers = layers
    with torch.device("meta"):
        model = family_of(config).model_class(model_config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, parameter in model.state_dict().items():
        if parameter.dim() == 1:  # norm weights (ones) and biases (zero)
            fill = 1.0 if name.endswith("norm.weight") else 0.0
            tensors[name] = torch.full(parameter.shape, fill, dtype=dtype)
        else:
            tensors[name] = (torch.randn(parameter.shape, generator=generator) * parameter.shape[-1] ** -0.5).to(dtype)
    partial = directory.with_name(directory.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    eos, mask = config["eos_token_id"], config["mask_token_id"]
    build_char_tokenizer(
        _CHARACTERS, config["vocab_size"], ("<|startoftext|>", eos - 1), ("<|endoftext|>", eos), ("<|mdm_mask|>", mask)
    ).save_pretrained(partial)
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    (partial / _COMPLETE).touch()
    if directory.exists():
        raise FileExistsError(f"{directory} exists")
    partial.rename(directory)
    return directory


def base_checkpoint(shape: str, layers: int | None, work_dir: Path) -> Path:
    """The unquantized checkpoint of a benchmark shape (built once under `work_dir`)."""
    if shape == "shipped":
        if layers is not None:
            raise ValueError(f"--layers applies to --shape {' / '.join(SHAPE_CONFIGS)}; the shipped model has its own depth")
        return SHIPPED_MODEL
    if shape not in SHAPE_CONFIGS:
        raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    layers = 2 if layers is None else layers
    if layers <= 0:
        raise ValueError(f"--layers must be positive, got {layers}")
    directory = work_dir / f"{shape}-{layers}l" / "bf16"
    if (directory / _COMPLETE).is_file():
        return directory
    return write_random_checkpoint(directory, json.loads(SHAPE_CONFIGS[shape].read_text()), layers)
