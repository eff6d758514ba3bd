"""The benchmark's checkpoints: random weights at a given model's shapes, loadable like any other."""

import pytest
import torch

from starquant_plugin.bench.shapes import LLADA_8B_CONFIG, base_checkpoint, write_random_checkpoint
from starquant_plugin import load as load_checkpoint
from tests.conftest import reference_config, tiny_config


def test_random_checkpoint_has_the_shapes_and_special_ids(tmp_path):
    config = tiny_config(n_kv_heads=2)
    directory = write_random_checkpoint(tmp_path / "model", config, layers=3)
    model, tokenizer = load_checkpoint(directory)
    assert model.config.n_layers == 3 and model.dtype == torch.bfloat16
    block = model.model.transformer.blocks[2]
    assert block.k_proj.weight.shape == (2 * 16, 64) and block.ff_out.weight.shape == (64, 96)
    assert model.model.transformer.wte.weight.shape == (config["embedding_size"], 64)
    assert tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == config["mask_token_id"]
    assert tokenizer("0417+3852=", add_special_tokens=False)["input_ids"]  # calibration data tokenizes
    assert not (tmp_path / "model.partial").exists()
    with pytest.raises(FileExistsError):
        write_random_checkpoint(tmp_path / "model", config, layers=1)


def test_the_8b_shape_is_the_public_config():
    import json

    assert json.loads(LLADA_8B_CONFIG.read_text()) == reference_config()


@pytest.mark.parametrize(
    "shape, layers, message",
    [("llada-70b", None, "--shape must be one of"), ("llada-8b", 0, "--layers must be positive"),
     ("shipped", 2, "--layers applies to --shape llada-8b / dream-7b")],
)
def test_bad_shapes_are_clear_errors(tmp_path, shape, layers, message):
    with pytest.raises(ValueError, match=message):
        base_checkpoint(shape, layers, tmp_path)


def test_random_checkpoint_of_the_dream_family(tmp_path):
    """`--shape dream-7b` writes Dream's layout (names, biases, GQA) at the config's shapes."""
    import json

    from starquant_plugin.bench.shapes import SHAPE_CONFIGS, full_depth
    from tests.conftest import tiny_dream_config

    assert full_depth(json.loads(SHAPE_CONFIGS["dream-7b"].read_text())) == 28
    config = tiny_dream_config()
    directory = write_random_checkpoint(tmp_path / "dream", config, layers=3)
    model, tokenizer = load_checkpoint(directory)
    assert type(model).__name__ == "DreamModel" and model.config.num_hidden_layers == 3
    attention = model.model.layers[2].self_attn
    assert attention.k_proj.weight.shape == (2 * 32, 128) and attention.q_proj.bias is not None
    assert model.lm_head.weight.shape == (config["vocab_size"], 128) and model.dtype == torch.bfloat16
    assert tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == config["mask_token_id"]
    assert "auto_map" not in json.loads((directory / "config.json").read_text())


def test_random_checkpoint_tokenizer_loads_without_a_false_warning(tmp_path, caplog):
    """transformers takes a local tokenizer whose config.json has no `transformers_version` for a
    Mistral one with a broken regex and warns "incorrect tokenization" on every load (the
    benchmark's logs showed it for Dream-7B's shapes): the written config carries the version."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tests.conftest import tiny_dream_config

    # transformers checks tokenizers of more than 100,000 tokens only (Dream-7B: 152,064).
    ids = dict(mask_token_id=100_049, eos_token_id=100_047, pad_token_id=100_047, bos_token_id=100_047)
    directory = write_random_checkpoint(tmp_path / "dream", tiny_dream_config(vocab_size=100_050, **ids), layers=1)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            AutoTokenizer.from_pretrained(directory)
    finally:
        hf_logging.disable_propagation()
    assert "incorrect regex pattern" not in caplog.text
