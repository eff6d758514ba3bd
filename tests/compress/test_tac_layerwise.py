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
