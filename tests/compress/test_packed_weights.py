"""4-bit weights are 4-bit on disk: `starquant quantize` writes int weights of fewer than 8 bits
`pack-quantized` (eight values per int32), unless the recipe names another format; the core reads
them back exactly; a packed tensor of the wrong shape, type or bit width is one clear error."""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file

from starquant_plugin import load as load_checkpoint
from starquant_plugin.checkpoint import validate_checkpoint
from starquant_plugin.errors import InputError
from tests.checkpoint_corruptions import copy_checkpoint, edit_config, edit_tensors
from tests.conftest import quantize_with_cli, random_hub_tensors, tiny_config, write_hub_checkpoint

LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
Q = "model.transformer.blocks.0.q_proj"

# The same RTN W4A8 as recipes/baselines/rtn_w4a8.yaml, its group naming compressed-tensors'
# inferred format for W4A8 (one int8 per 4-bit value).
INT_QUANTIZED_W4A8 = """\
rtn_stage:
  rtn_modifiers:
    QuantizationModifier:
      ignore: ["lm_head", "model.transformer.ff_out"]
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}
          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: token, dynamic: true}
          format: int-quantized
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny GQA model (d_model 256) quantized RTN W4A8 (packed, the default), RTN W4A8 with the
    recipe asking for int-quantized, and RTN W8A8."""
    tmp = tmp_path_factory.mktemp("packed")
    config = tiny_config(d_model=256, mlp_hidden_size=512, n_kv_heads=2)
    directory = write_hub_checkpoint(tmp / "tiny", config, random_hub_tensors(config, seed=5))
    dataset = tmp / "calibration.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"abc{i}=", "answer": f"answer {i}"}) + "\n" for i in range(4)))
    recipe = tmp / "int_quantized.yaml"
    recipe.write_text(INT_QUANTIZED_W4A8)
    extra = ("--dataset", str(dataset), "--num-samples", "8")
    return {
        "config": config,
        "packed": quantize_with_cli(directory, "baselines/rtn_w4a8.yaml", tmp / "packed", *extra),
        "int": quantize_with_cli(directory, str(recipe), tmp / "int", *extra),
        "w8": quantize_with_cli(directory, "baselines/rtn_w8a8.yaml", tmp / "w8", *extra),
    }


def block_bytes(directory) -> int:
    return sum(t.numel() * t.element_size() for n, t in load_file(directory / "model.safetensors").items()
               if ".blocks." in n)


def test_w4_weights_are_packed_eight_per_int32(checkpoints):
    config = checkpoints["config"]
    saved = json.loads((checkpoints["packed"] / "config.json").read_text())["quantization_config"]
    assert [g["format"] for g in saved["config_groups"].values()] == ["pack-quantized"]
    stored = load_file(checkpoints["packed"] / "model.safetensors")
    linears = validate_checkpoint(checkpoints["packed"]).packed_shapes
    assert len(linears) == len(LINEARS) * config["n_layers"]
    for name, (out_features, in_features) in linears.items():
        assert stored[f"{name}.weight_packed"].dtype == torch.int32
        assert stored[f"{name}.weight_packed"].shape == (out_features, in_features // 8)
        assert stored[f"{name}.weight_shape"].tolist() == [out_features, in_features]
        codes = unpack_from_int32(stored[f"{name}.weight_packed"], 4, torch.Size((out_features, in_features)))
        assert codes.min() >= -8 and codes.max() <= 7
    # The target: W4 block tensors at most 0.55x the W8 checkpoint's (int4 codes + group scales).
    assert block_bytes(checkpoints["packed"]) <= 0.55 * block_bytes(checkpoints["w8"])
    # Asked for by the recipe, int-quantized stays (one int8 per value): twice the codes' bytes.
    assert json.loads((checkpoints["int"] / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    assert load_file(checkpoints["int"] / "model.safetensors")[f"{Q}.weight"].dtype == torch.int8
    assert block_bytes(checkpoints["int"]) > 1.8 * block_bytes(checkpoints["packed"])


def test_packed_and_int_quantized_reload_as_the_same_model(checkpoints):
    packed, _ = load_checkpoint(checkpoints["packed"])
    unpacked, _ = load_checkpoint(checkpoints["int"])
    weights = {n: p for n, p in unpacked.named_parameters()}
    # compressed-tensors keeps the packed modules' `weight_shape` after decompressing; the rest is the same.
    extra = {n for n, _ in packed.named_parameters()} - set(weights)
    assert extra and all(n.endswith(".weight_shape") for n in extra)
    for name, parameter in packed.named_parameters():
        if name not in extra:
            assert torch.equal(parameter, weights[name]), name
    ids = torch.randint(0, checkpoints["config"]["vocab_size"], (2, 12))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, unpacked(input_ids=ids).logits)


def _set_weight_bits(config: dict, bits: int) -> None:
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["num_bits"] = bits


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: edit_tensors(d, lambda t: t.__setitem__(f"{Q}.weight_packed", t[f"{Q}.weight_packed"][:, :-1].contiguous())),
         rf"tensor {Q}\.weight_packed has shape \(256, 31\), expected \(256, 32\)"),
        # The config says 8 bits, the file holds 4-bit words: 4 values per int32 expected.
        (lambda d: edit_config(d, lambda c: _set_weight_bits(c, 8)),
         rf"tensor {Q}\.weight_packed has shape \(256, 32\), expected \(256, 64\)"),
        (lambda d: edit_tensors(d, lambda t: t.__setitem__(f"{Q}.weight_packed", t[f"{Q}.weight_packed"].to(torch.int8))),
         rf"tensor {Q}\.weight_packed is I8, expected int32"),
        (lambda d: edit_tensors(d, lambda t: t.__setitem__(f"{Q}.weight_shape", torch.tensor([256, 128]))),
         rf"tensor {Q}\.weight_shape holds \[256, 128\], expected \[256, 256\]"),
    ],
    ids=["packed-width", "bit-width", "packed-dtype", "weight-shape"],
)
def test_a_wrong_packed_tensor_is_one_clear_error(checkpoints, tmp_path, corrupt, message):
    directory = copy_checkpoint(checkpoints["packed"], tmp_path / "checkpoint")
    corrupt(directory)
    with pytest.raises(InputError, match=message):
        validate_checkpoint(directory)
    with pytest.raises(InputError, match=message):
        load_checkpoint(directory)
