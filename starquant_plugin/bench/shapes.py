"""Checkpoints for the benchmark: the shipped model, or random weights at a real model's shapes.

`--shape llada-8b --layers N` times LLaDA-8B's real layer shapes (d_model 4096, MLP 12288,
32 heads, the 126,464-row vocabulary) with N blocks, so one CPU can time them. Weights are
random (timing does not depend on their values) and saved in bf16 with a character tokenizer
that carries the config's special ids, so the same recipes and calibration data apply.
"""

import json
from pathlib import Path

import torch

from ..assets import SHIPPED_MODEL

__all__ = ["SHAPES", "LLADA_8B_CONFIG", "base_checkpoint", "write_random_llada"]

SHAPES = ("shipped", "llada-8b")
LLADA_8B_CONFIG = Path(__file__).with_name("llada-8b-config.json")
# Characters of the shipped model's calibration data, so its calibration set tokenizes.
_CHARACTERS = "0123456789+-= abcdefghijklmnopqrstuvwxyz"
_COMPLETE = ".complete"


def write_random_llada(directory: Path, config: dict, layers: int, seed: int = 0, dtype=torch.bfloat16) -> Path:
    """A LLaDA-format checkpoint with `layers` blocks of `config`'s shapes and random weights.

    Written to a temporary name and renamed when complete, so an interrupted run leaves
    nothing that looks like a checkpoint.
    """
    from safetensors.torch import save_file

    from ..models.char_tokenizer import build_char_tokenizer

    config = dict(config, n_layers=layers, dtype=str(dtype).removeprefix("torch."))
    config.pop("auto_map", None)  # served and loaded natively, no remote code
    d, heads, kv_heads = config["d_model"], config["n_heads"], config["n_kv_heads"] or config["n_heads"]
    head_dim, mlp, vocab = d // heads, config["mlp_hidden_size"], config["embedding_size"]
    generator = torch.Generator().manual_seed(seed)

    def weight(rows: int, columns: int) -> torch.Tensor:
        return (torch.randn(rows, columns, generator=generator) * columns**-0.5).to(dtype)

    tensors = {"model.transformer.wte.weight": weight(vocab, d), "model.transformer.ln_f.weight": torch.ones(d, dtype=dtype)}
    if not config.get("weight_tying"):
        tensors["model.transformer.ff_out.weight"] = weight(vocab, d)
    for i in range(layers):
        prefix = f"model.transformer.blocks.{i}."
        tensors.update({
            prefix + "attn_norm.weight": torch.ones(d, dtype=dtype),
            prefix + "ff_norm.weight": torch.ones(d, dtype=dtype),
            prefix + "q_proj.weight": weight(heads * head_dim, d),
            prefix + "k_proj.weight": weight(kv_heads * head_dim, d),
            prefix + "v_proj.weight": weight(kv_heads * head_dim, d),
            prefix + "attn_out.weight": weight(d, heads * head_dim),
            prefix + "ff_proj.weight": weight(mlp, d),
            prefix + "up_proj.weight": weight(mlp, d),
            prefix + "ff_out.weight": weight(d, mlp),
        })
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
            raise ValueError("--layers applies to --shape llada-8b; the shipped model has its own depth")
        return SHIPPED_MODEL
    if shape != "llada-8b":
        raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    layers = 2 if layers is None else layers
    if layers <= 0:
        raise ValueError(f"--layers must be positive, got {layers}")
    directory = work_dir / f"llada-8b-{layers}l" / "bf16"
    if (directory / _COMPLETE).is_file():
        return directory
    config = json.loads(LLADA_8B_CONFIG.read_text())
    return write_random_llada(directory, config, layers)
