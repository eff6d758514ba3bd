"""The rotation baseline (QuIP-style Hadamard + GPTQ): its recipe runs, and the checkpoint reloads
with its online rotations re-attached (transformers alone would drop them and compute garbage)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import starquant_plugin  # noqa: F401
from tests.conftest import oneshot_tiny, reloaded_logits

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "baselines"


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    output, probe, (full_precision, in_memory, weights_only), _ = oneshot_tiny(
        tmp_path_factory.mktemp("rotation"), str(RECIPES / "rotation_w8a8.yaml"), seed=3)
    return output, probe, full_precision, in_memory, weights_only


def test_rotation_checkpoint_stores_its_transforms(rotated):
    output = rotated[0]
    saved = json.loads((output / "config.json").read_text())
    assert saved["quantization_config"]["transform_config"]["config_groups"]
    names = load_file(output / "model.safetensors").keys()
    assert any(name.endswith("v_input.weight") for name in names)
    assert "starquant_config" not in saved


def test_rotation_checkpoint_reloads_with_its_rotations(rotated):
    output, probe, full_precision, in_memory, weights_only = rotated
    reloaded, reloaded_weights_only, linears = reloaded_logits(output, probe)
    assert len(linears) == 7 * 2  # the LM head is neither rotated nor quantized
    torch.testing.assert_close(reloaded_weights_only, weights_only, atol=1e-4, rtol=1e-4)
    relative = lambda a, b: ((a - b).abs().mean() / b.abs().mean()).item()  # noqa: E731
    assert relative(reloaded, in_memory) < 0.1  # our per-token int8 activations vs compressed-tensors' in memory
    assert relative(reloaded, full_precision) < 0.1  # W8A8 stays close to full precision: the rotation is undone
