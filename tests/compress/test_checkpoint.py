"""STaR-Quant checkpoints: oneshot output -> starquant_config + tensors -> validated reload."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import starquant_plugin  # noqa: F401
from starquant_plugin.checkpoint import atomic_output_dir
from starquant_plugin.checkpoint.config import FORMAT_VERSION
from starquant_plugin import load as load_checkpoint
from tests.conftest import oneshot_tiny, reloaded_logits

RECIPE = """
starquant_stage:
  starquant_modifiers:
    SGATModifier: {rotation_block_size: 32, activation_bits: 8, weight_bits: 8}
    GPTQModifier: {targets: ["Linear"], ignore: ["model.transformer.ff_out"], scheme: W8A8}
    TACModifier: {num_trajectories: 4, num_buckets: 2}
"""


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    output, probe, (_, in_memory, in_memory_weights_only), config = oneshot_tiny(tmp_path_factory.mktemp("ckpt"), RECIPE, seed=5)
    return output, probe, (in_memory, in_memory_weights_only), config


def test_config_block_and_tensors_written(quantized):
    output, _, _, config = quantized
    saved = json.loads((output / "config.json").read_text())
    block = saved["starquant_config"]
    assert block["format_version"] == FORMAT_VERSION and block["mask_token_id"] == config["mask_token_id"]
    edges = block["tac"].pop("bucket_edges")
    assert block["sgat"]["rotation_block_size"] == 32 and block["tac"] == {"block_size": 32, "num_buckets": 2, "ridge": 0.01}
    assert len(edges) == 1 and 0 < edges[0] < 1  # the median mask ratio of the calibration trajectories
    assert saved["quantization_config"]["quant_method"] == "compressed-tensors"
    names = load_file(output / "model.safetensors").keys()
    assert "model.transformer.blocks.1.attn_out.tac_matrices" in names
    assert "model.transformer.blocks.1.attn_out.sgat_smoothing" in names  # GQA: on line
    assert "model.transformer.blocks.0.q_proj.weight" in names and "model.transformer.blocks.0.q_proj.weight_scale" in names


def test_reload_matches_in_memory_model(quantized):
    """Weights, SGAT and TAC reload exactly; activation quantization is ours on reload (scale
    absmax/127, as the int8 kernels) and compressed-tensors' in memory (absmax/127.5)."""
    output, probe, (in_memory, in_memory_weights_only), _ = quantized
    reloaded, weights_only, linears = reloaded_logits(output, probe)
    assert len(linears) == 7 * 2
    assert all(m.quantization_enabled is False for m in linears)  # no second quantizer
    torch.testing.assert_close(weights_only, in_memory_weights_only, atol=1e-5, rtol=1e-5)
    error = ((reloaded - in_memory).abs().mean() / in_memory.abs().mean()).item()
    assert 0 < error < 0.1  # measured 0.047 on this random-weight model


def test_tac_bucket_edges_reload_and_format_1_reads_equal_width_buckets(quantized, tmp_path):
    output = quantized[0]
    edges = json.loads((output / "config.json").read_text())["starquant_config"]["tac"]["bucket_edges"]
    reloaded, _ = load_checkpoint(output)
    attn_out = reloaded.model.transformer.blocks[0].attn_out
    torch.testing.assert_close(attn_out.tac_bucket_edges, torch.tensor(edges))
    assert "tac_bucket_edges" not in attn_out.state_dict()  # config.json holds them, not the weights
    # A format 1 checkpoint (before bucket_edges) still loads, with the edges k/K it was written for.
    old = _copy(quantized, tmp_path)
    _edit_config(old, lambda c: (c["starquant_config"].update(format_version=1), c["starquant_config"]["tac"].pop("bucket_edges")))
    old_model, _ = load_checkpoint(old)
    torch.testing.assert_close(old_model.model.transformer.blocks[0].attn_out.tac_bucket_edges, torch.tensor([0.5]))


def _copy(quantized, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(quantized[0], target)
    return target


def _edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: _edit_tensors(d, lambda t: t.pop("model.transformer.blocks.1.v_proj.sgat_shift")),
         "missing STaR-Quant tensor model.transformer.blocks.1.v_proj.sgat_shift"),
        (lambda d: _edit_tensors(d, lambda t: t.__setitem__("model.transformer.blocks.0.attn_out.tac_offsets", torch.zeros(2, 64))),
         r"attn_out.tac_offsets has shape \(2, 64\), expected \(2, 128\)"),
        (lambda d: _edit_config(d, lambda c: c["starquant_config"].__setitem__("format_version", FORMAT_VERSION + 1)),
         f"format_version {FORMAT_VERSION + 1} is newer than this starquant-plugin reads"),
        (lambda d: _edit_config(d, lambda c: c["starquant_config"].__setitem__("mask_token_id", 3)),
         "starquant_config.mask_token_id=3 does not match"),
        (lambda d: _edit_config(d, lambda c: c["starquant_config"]["tac"].update(num_buckets=3, bucket_edges=[0.2, 0.4])),
         r"tac_matrices has shape \(2, 4, 32, 32\), expected \(3, 4, 32, 32\)"),
        (lambda d: _edit_config(d, lambda c: c["starquant_config"]["tac"].__setitem__("num_buckets", 3)),
         "starquant_config.tac: .*bucket_edges has 1 edges; num_buckets=3 needs 2"),
        (lambda d: _edit_config(d, lambda c: c["starquant_config"]["tac"].__setitem__("bucket_edges", [1.5])),
         r"bucket_edges must be ascending mask ratios in \[0, 1\], got \[1.5\]"),
        (lambda d: _edit_config(d, lambda c: c["starquant_config"].pop("sgat")),
         "tensors the starquant_config does not account for"),
        (lambda d: _edit_config(d, lambda c: c["starquant_config"]["sgat"].__setitem__("centre", "median")),
         "starquant_config.sgat.centre"),
    ],
)
def test_malformed_checkpoint_is_a_clear_error(quantized, tmp_path, corrupt, message):
    directory = _copy(quantized, tmp_path)
    corrupt(directory)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(directory)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")
    assert (tmp_path / "out" / "config.json").is_file() and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ValueError, match="already exists"):
        with atomic_output_dir(tmp_path / "out"):
            pass
