"""The benchmark's checkpoints: random weights at a given model's shapes, loadable like any other."""

import pytest
import torch

from starquant_plugin.bench.shapes import LLADA_8B_CONFIG, base_checkpoint, write_random_llada
from starquant_plugin.models import load_llada
from tests.conftest import reference_config, tiny_config


def test_random_checkpoint_has_the_shapes_and_special_ids(tmp_path):
    config = tiny_config(n_kv_heads=2)
    directory = write_random_llada(tmp_path / "model", config, layers=3)
    model, tokenizer = load_llada(directory)
    assert model.config.n_layers == 3 and model.dtype == torch.bfloat16
    block = model.model.transformer.blocks[2]
    assert block.k_proj.weight.shape == (2 * 16, 64) and block.ff_out.weight.shape == (64, 96)
    assert model.model.transformer.wte.weight.shape == (config["embedding_size"], 64)
    assert tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == config["mask_token_id"]
    assert tokenizer("0417+3852=", add_special_tokens=False)["input_ids"]  # calibration data tokenizes
    assert not (tmp_path / "model.partial").exists()
    with pytest.raises(FileExistsError):
        write_random_llada(tmp_path / "model", config, layers=1)


def test_the_8b_shape_is_the_public_config():
    import json

    assert json.loads(LLADA_8B_CONFIG.read_text()) == reference_config()


@pytest.mark.parametrize(
    "shape, layers, message",
    [("llada-70b", None, "--shape must be one of"), ("llada-8b", 0, "--layers must be positive"),
     ("shipped", 2, "--layers applies to --shape llada-8b")],
)
def test_bad_shapes_are_clear_errors(tmp_path, shape, layers, message):
    with pytest.raises(ValueError, match=message):
        base_checkpoint(shape, layers, tmp_path)
