"""Read a checkpoint directory of a registered family (hub layout): its config.json and its tokenizer.

Loading a model, full precision or quantized, lives above `models/` and `checkpoint/`:
`starquant_plugin.load` (`starquant_plugin/loading.py`).
"""

import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import InputError
from .family import family_of

__all__ = ["DTYPES", "PICKLE_SUFFIXES", "read_model_config", "load_tokenizer", "resolve_model"]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# torch.save / pickle files: loading one can run arbitrary code, so they are never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model(model: str | Path) -> Path:
    """A checkpoint directory, or a hub id (`GSAI-ML/LLaDA-8B-Instruct`) resolved from the local
    Hugging Face cache without any download (`huggingface_hub.snapshot_download(local_files_only=True)`;
    `HF_HUB_CACHE` / `HF_HOME` say where the cache is). InputError naming `huggingface-cli download`
    when the id is not cached."""
    path = Path(model)
    text = str(model)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/")) or any(c in text for c in " \\"):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # the cache named by the environment now (huggingface_hub reads it once, at import)
        return Path(snapshot_download(text, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except LocalEntryNotFoundError:
        raise InputError(f"{text}: no such directory, and not in the local Hugging Face cache; download it first: "
                         f"huggingface-cli download {text}") from None


def read_model_config(model_dir: str | Path) -> dict:
    """The parsed `config.json` of a checkpoint directory of a registered family (`models/family.py`);
    InputError naming what is wrong."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model directory not found: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"{model_dir} is not a model directory: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" ({error.msg} at line {error.lineno})" if isinstance(error, json.JSONDecodeError) else ""
        raise InputError(f"{config_path}: not valid JSON{where}") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: not a JSON object (found {type(config).__name__})")
    try:
        family_of(config)
    except InputError as error:
        raise InputError(f"{config_path}: {error}") from None
    has_weights = any(
        (model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )
    if not has_weights:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InputError(
                f"{model_dir / pickles[0]}: a pickle checkpoint; only safetensors are read (loading a pickle can "
                "run arbitrary code): re-save it with save_pretrained(..., safe_serialization=True)"
            )
        raise InputError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    return config


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, left-padding (prompts end where the generation starts)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:  # noqa: BLE001 - `tokenizers` raises bare Exceptions for malformed files
        raise InputError(f"{model_dir}: cannot load the tokenizer ({type(error).__name__}: {error})") from None
    tokenizer.padding_side = "left"
    return tokenizer
