"""One table of checkpoint corruptions, each with the one-line error it must produce, shared by the
core-side (tests/compress) and vLLM-side (tests/serve) validation tests.

Every corruption edits a copy of a real STaR-Quant W8A8 checkpoint of the tiny GQA model
(`starquant_w8a8_checkpoint` in conftest.py: d_model 128, vocab 50, mask id 49, one
model.safetensors) with safetensors: read all tensors, drop or change one, save.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CORRUPTIONS", "copy_checkpoint"]


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def shard(directory: Path, shards: int = 2) -> list[str]:
    """Re-save model.safetensors as `shards` files with an index; returns the shard names."""
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names, weight_map = sorted(tensors), {}
    files = [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)]
    for s, file in enumerate(files):
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def point_index_outside(directory: Path) -> None:
    """Shard 2 moved to ../elsewhere and the index pointing there."""
    second = shard(directory)[1]
    elsewhere = directory.parent / "elsewhere"
    elsewhere.mkdir()
    (directory / second).rename(elsewhere / second)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f"../elsewhere/{v}" if v == second else v for k, v in index["weight_map"].items()}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def symlink_shard_outside(directory: Path) -> None:
    """Shard 2 a symlink to a file outside the checkpoint directory."""
    second = shard(directory)[1]
    outside = directory.parent / f"outside-{second}"
    (directory / second).rename(outside)
    os.symlink(outside, directory / second)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def replace_with_pickle(directory: Path) -> None:
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def set_activation_bits(config: dict, bits: int) -> None:
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"]["num_bits"] = bits


HEAD = "model.transformer.ff_out"
Q_SCALE = "model.transformer.blocks.0.q_proj.weight_scale"
NORM = "model.transformer.blocks.1.ff_norm.weight"
WEIGHTS = r"model\.safetensors"

# class -> (corrupt(directory), regex the one-line error must match)
CORRUPTIONS = {
    "removed weight_scale": (
        lambda d: edit_tensors(d, lambda t: t.pop(Q_SCALE)),
        rf"{WEIGHTS}: missing tensor {Q_SCALE} \(shape \(128, 1\)\)",
    ),
    "removed LM head tensor": (
        lambda d: edit_tensors(d, lambda t: t.pop(f"{HEAD}.weight")),
        rf"{WEIGHTS}: missing tensor {HEAD}\.weight \(shape \(64, 128\)\)",
    ),
    "removed norm": (
        lambda d: edit_tensors(d, lambda t: t.pop(NORM)),
        rf"{WEIGHTS}: missing tensor {NORM} \(shape \(128,\)\)",
    ),
    "removed STaR-Quant tensor": (
        lambda d: edit_tensors(d, lambda t: t.pop("model.transformer.blocks.1.attn_out.sgat_smoothing")),
        rf"{WEIGHTS}: missing STaR-Quant tensor model\.transformer\.blocks\.1\.attn_out\.sgat_smoothing",
    ),
    "unexpected tensor": (
        lambda d: edit_tensors(d, lambda t: t.__setitem__("model.transformer.extra.weight", torch.zeros(2))),
        rf"{WEIGHTS}: unexpected tensor model\.transformer\.extra\.weight",
    ),
    "dropped quantization_config": (
        lambda d: edit_config(d, lambda c: c.pop("quantization_config")),
        rf"{WEIGHTS}: holds quantized tensors \(.*weight_scale\) but .*config\.json has no quantization_config",
    ),
    "dropped ignore list": (
        lambda d: edit_config(d, lambda c: c["quantization_config"].__setitem__("ignore", [])),
        (
            rf"{WEIGHTS}: {HEAD} is stored unquantized \({HEAD}\.weight is F32, no weight_scale\) but "
            r"quantization_config quantizes it as W8A8 .*missing from quantization_config\.ignore"
        ),
    ),
    "quantized layer in the ignore list": (
        lambda d: edit_config(d, lambda c: c["quantization_config"]["ignore"].append("re:.*blocks\\.0\\.q_proj$")),
        (
            rf"{WEIGHTS}: {Q_SCALE} is a quantization parameter but quantization_config does not quantize "
            r"model\.transformer\.blocks\.0\.q_proj"
        ),
    ),
    "truncated safetensors": (
        lambda d: truncate(d / "model.safetensors"),
        rf"{WEIGHTS}: truncated: the file has \d+ bytes, its header describes \d+",
    ),
    "zero-byte safetensors": (
        lambda d: (d / "model.safetensors").write_bytes(b""),
        rf"{WEIGHTS}: empty file \(0 bytes\)",
    ),
    "wrong tensor shape": (
        lambda d: edit_tensors(d, lambda t: t.__setitem__(NORM, torch.ones(64))),
        rf"{WEIGHTS}: tensor {NORM} has shape \(64,\), expected \(128,\)",
    ),
    "wrong quantized weight dtype": (
        lambda d: edit_tensors(d, lambda t: t.__setitem__("model.transformer.blocks.0.q_proj.weight",
                                                          t["model.transformer.blocks.0.q_proj.weight"].float())),
        rf"{WEIGHTS}: tensor model\.transformer\.blocks\.0\.q_proj\.weight is F32, expected int8",
    ),
    "out-of-vocabulary mask_token_id": (
        lambda d: edit_config(d, lambda c: c.update(mask_token_id=50)),
        r"config\.json: mask_token_id=50 is outside the vocabulary \[0, 50\)",
    ),
    "out-of-vocabulary pad_token_id": (
        lambda d: edit_config(d, lambda c: c.update(pad_token_id=-1)),
        r"config\.json: pad_token_id=-1 is outside the vocabulary \[0, 50\)",
    ),
    "out-of-vocabulary eos_token_id": (
        lambda d: edit_config(d, lambda c: c.update(eos_token_id=[47, 4000])),
        r"config\.json: eos_token_id=4000 is outside the vocabulary \[0, 50\)",
    ),
    "missing shard": (
        lambda d: (d / shard(d)[1]).unlink(),
        (
            r"model\.safetensors\.index\.json: weight_map\[.*\] = 'model-00002-of-00002\.safetensors': "
            r"the shard does not exist"
        ),
    ),
    "index pointing to ../elsewhere": (
        point_index_outside,
        (
            r"model\.safetensors\.index\.json: weight_map\[.*\] = '\.\./elsewhere/model-00002-of-00002\.safetensors': "
            r"shards must be files inside"
        ),
    ),
    "shard symlinked outside": (
        symlink_shard_outside,
        (
            r"model\.safetensors\.index\.json: model-00002-of-00002\.safetensors resolves to .*outside-model-00002.*, "
            r"outside the checkpoint directory"
        ),
    ),
    "pickle instead of safetensors": (
        replace_with_pickle,
        r"pytorch_model\.bin: a pickle checkpoint; only safetensors are read",
    ),
    "bad starquant_config field": (
        lambda d: edit_config(d, lambda c: c["starquant_config"]["tac"].update(block_size=0)),
        r"config\.json: starquant_config\.tac\.block_size: Input should be greater than 0",
    ),
    "starquant_config mask id mismatch": (
        lambda d: edit_config(d, lambda c: c["starquant_config"].update(mask_token_id=3)),
        r"config\.json: starquant_config\.mask_token_id=3 does not match the model's mask_token_id=49",
    ),
    "static activation scheme": (
        lambda d: edit_config(d, lambda c: [g["input_activations"].update(dynamic=False, strategy="tensor")
                                            for g in c["quantization_config"]["config_groups"].values()]),
        (
            r"config\.json: quantization_config quantizes model\.transformer\.blocks\.0\.q_proj as W8A8 .*per tensor "
            r"static\); only dynamic per-token integer activation quantization is supported"
        ),
    ),
}
