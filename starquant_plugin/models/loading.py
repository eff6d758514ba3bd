"""Load LLaDA-format checkpoint directories (hub layout) with their tokenizer."""

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from ..checkpoint.loader import parse_starquant_config
from .llada import LLaDAConfig

__all__ = ["DTYPES", "read_llada_config", "load_llada", "load_tokenizer"]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_llada_config(model_dir: str | Path) -> dict:
    """The parsed `config.json` of a LLaDA-format directory; ValueError naming what is wrong."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory not found: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} is not a LLaDA-format model directory: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(config, dict) or config.get("model_type") != LLaDAConfig.model_type:
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(
            f"{config_path}: model_type is {found!r}, expected 'llada' (a LLaDA-format checkpoint)"
        )
    has_weights = any(
        (model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )
    if not has_weights:
        raise ValueError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    return config


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, left-padding (prompts end where the generation starts)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ValueError(f"{model_dir}: cannot load the tokenizer ({error})") from None
    tokenizer.padding_side = "left"
    return tokenizer


def load_llada(
    model_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a LLaDA-format checkpoint (single file or sharded) and its tokenizer, in eval mode.

    Args:
        dtype: `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = read_llada_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is None:
        # Padding is hidden by the attention mask, so any id serves; prefer the config's.
        tokenizer.pad_token_id = config.get("pad_token_id", config.get("eos_token_id"))
    if "quantization_config" not in config:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
        return model, tokenizer
    # A compressed-tensors checkpoint: decompress into fake-quant weights, then attach the
    # STaR-Quant tensors and activation quantizers.
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from ..checkpoint import load_quantized_into

    parse_starquant_config(config, Path(model_dir) / "config.json")  # fail before the slow load
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report lists our SGAT/TAC tensors as unexpected
    try:
        with warnings.catch_warnings():
            # dequantize=True is deliberate; transformers warns that the checkpoint has its own config.
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=DTYPES[dtype], quantization_config=CompressedTensorsConfig(dequantize=True)
            )
    finally:
        transformers_logging.set_verbosity(verbosity)
    load_quantized_into(model.to(device).eval(), model_dir, config)
    return model, tokenizer
