"""TAC's full-precision reference read one block at a time, and the partial forwards on cached states."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import starquant_plugin  # noqa: F401
from starquant_plugin.assets import SHIPPED_DREAM_MODEL, SHIPPED_MODEL
from starquant_plugin.compress.tac.layerwise import BlockwiseReference, block_input, entering
from starquant_plugin.errors import InputError


@pytest.mark.parametrize("directory", [SHIPPED_MODEL, SHIPPED_DREAM_MODEL], ids=["llada", "dream-sharded"])
def test_blockwise_reference_gives_the_whole_models_logits_and_shares_untouched_weights(directory):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    reference = BlockwiseReference(directory, torch.float32, torch.device("cpu"), share=model)
    ids = torch.randint(0, 20, (3, 11))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        state, depth = block_input(reference.model, 0, ids), len(reference.blocks)
        halfway = None
        for index in range(depth):
            with reference.block(index):
                state = block_input(reference.model, index + 1, ids, state)
            if index + 1 == depth // 2:
                halfway = state
            assert all(p.is_meta for p in reference.blocks[index].parameters())  # dropped on leaving
        with entering(reference.model, depth, state, end=depth):
            got = reference.model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        # A window: the logits from the middle = the model's own with its later blocks skipped.
        with entering(reference.model, depth // 2, halfway, end=depth // 2):
            lens = reference.model(input_ids=ids).logits
        with entering(model, 0, None, end=depth // 2):
            torch.testing.assert_close(lens, model(input_ids=ids).logits, rtol=0, atol=0)
    mine = {n: p.data_ptr() for n, p in model.named_parameters()}
    outside = {n: p for n, p in reference.model.named_parameters() if not p.is_meta}
    assert outside and all(p.data_ptr() == mine[n] for n, p in outside.items())  # no copy of embedding/head
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)  # as if the quantization had changed it
    changed = BlockwiseReference(directory, torch.float32, torch.device("cpu"), share=model)
    embedding = changed.model.get_input_embeddings().weight
    assert embedding.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(embedding * 1.5, model.get_input_embeddings().weight)


def test_reference_must_be_a_full_precision_checkpoint(tmp_path):
    with pytest.raises(InputError, match="TACModifier.reference_model.*not found"):
        BlockwiseReference(tmp_path / "missing", torch.float32, torch.device("cpu"))


def test_weights_fake_quantized_once_is_exact_also_for_offloaded_weights(tmp_path):
    """TAC runs the stored fake-quantized weights instead of fake-quantizing them in every forward;
    a disk-offloaded weight (llm-compressor's sequential pipeline on a GPU) returns a fresh copy on
    each access, so the weight must be written where it lives, or the forwards would run unquantized."""
    from compressed_tensors.offload.module import offload_module
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from starquant_plugin.compress.tac.base import _weights_fake_quantized_once

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 16, bias=False)).to(torch.bfloat16)
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": preset_name_to_scheme("W8A8", ["Linear"])}))
    for linear in model:
        with torch.no_grad():
            linear.weight_scale.copy_((linear.weight.abs().amax(1, keepdim=True) / 127).to(linear.weight_scale.dtype))
        linear.quantization_status = QuantizationStatus.FROZEN
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        offload_module(model[0], "cpu", "disk", offload_dir=str(tmp_path))
        quantized = forward_quantize(model[0], model[0].weight.data, "weight", model[0].quantization_scheme.weights)
        assert not torch.equal(quantized, model[0].weight.data)
        with _weights_fake_quantized_once(model):
            assert all(linear.quantization_scheme.weights is None for linear in model)
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        assert all(linear.quantization_scheme.weights is not None for linear in model)  # restored
        assert torch.equal(model[0].weight.data, quantized)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
