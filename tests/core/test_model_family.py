"""The model-family registry: lookups, site maps, the logits shift, the vLLM layer names."""

import dataclasses

import pytest
import torch

from starquant_plugin.errors import InputError
from starquant_plugin.models import LLaDAConfig, LLaDAModelLM, family_of, known_model_types
from starquant_plugin.quantization.mappings import sgat_sites, tac_target
from tests.conftest import tiny_config


def test_unknown_model_type_names_it_and_the_supported_ones():
    with pytest.raises(InputError, match=r"model_type 'llama' is not a supported diffusion LLM family \(supported: .*llada"):
        family_of({"model_type": "llama"})
    assert "llada" in known_model_types()


@pytest.mark.parametrize("kv_heads, online", [(4, []), (2, ["attention_output"])])
def test_llada_sites_fold_into_the_producer_except_through_grouped_attention(kv_heads, online):
    config = LLaDAConfig(**{k: v for k, v in tiny_config(n_kv_heads=kv_heads).items() if k != "model_type"})
    model = LLaDAModelLM(config)
    block = model.model.transformer.blocks[0]
    family = family_of(config)
    assert family.online_smoothing_sites(config) == online
    sites = sgat_sites(block, config)
    assert list(sites) == ["attention_input", "attention_output", "mlp_input", "mlp_output"]
    assert sites["attention_input"].linears == [block.q_proj, block.k_proj, block.v_proj]
    assert sites["attention_input"].fold_into is block.attn_norm
    assert sites["attention_output"].fold_into is (None if online else block.v_proj)
    assert sites["mlp_input"].linears == [block.ff_proj, block.up_proj] and sites["mlp_input"].fold_into is block.ff_norm
    assert sites["mlp_output"].linears == [block.ff_out] and sites["mlp_output"].fold_into is block.up_proj
    assert tac_target(block, config) is block.attn_out
    assert family.block_list(model) is model.model.transformer.blocks
    assert model.get_submodule(family.lm_head) is model.get_output_embeddings()
    assert model.get_submodule(family.embedding) is model.get_input_embeddings()


def test_vllm_layer_names_map_to_sites():
    family = family_of("llada")
    assert family.vllm_site("model.transformer.blocks.12.qkv_proj") == "attention_input"
    assert family.vllm_site("model.transformer.blocks.0.attn_out") == "attention_output"
    assert family.vllm_site("model.transformer.blocks.3.gate_up_proj") == "mlp_input"
    assert family.vllm_site("model.transformer.blocks.3.ff_out") == "mlp_output"
    assert family.vllm_site("model.transformer.ff_out") is None  # the LM head shares the down projection's name
    assert family.vllm_site("model.transformer.blocks.3.attn_norm") is None


def _raw_logits(batch=2, seq=9, vocab=5):
    return torch.randn(batch, seq, vocab, generator=torch.Generator().manual_seed(0))


def test_no_shift_reads_predictions_as_they_are():
    family, raw = family_of("llada"), _raw_logits()
    assert family.predictions(raw) is raw
    assert family.raw_window((3, 7)) == (3, 7)


def test_shifted_family_reads_position_i_from_raw_i_minus_1_and_windows_agree():
    family = dataclasses.replace(family_of("llada"), logits_shift=1)
    raw = _raw_logits()
    predictions = family.predictions(raw)
    assert torch.equal(predictions[:, 0], raw[:, 0])  # the first position predicts itself
    assert torch.equal(predictions[:, 1:], raw[:, :-1])
    for lo in range(0, 9):
        for hi in range(lo + 1, 10):
    # A windowed read (the LM head on the positions needed only) must give the same rows.
            raw_lo, raw_hi = family.raw_window((lo, hi))
            assert torch.equal(family.predictions(raw[:, raw_lo:raw_hi], (lo, hi)), predictions[:, lo:hi]), (lo, hi)


def test_dream_sites_and_names(tiny_dream_checkpoint):
    from starquant_plugin import load

    directory, config, _ = tiny_dream_checkpoint
    model, tokenizer = load(directory)
    family = family_of(model.config)
    assert family.model_type == "Dream" and family.logits_shift == 1
    block = model.model.layers[1]
    sites = sgat_sites(block, model.config)
    attention, mlp = block.self_attn, block.mlp
    assert sites["attention_input"].linears == [attention.q_proj, attention.k_proj, attention.v_proj]
    assert sites["attention_input"].fold_into is block.input_layernorm
    assert sites["attention_output"].linears == [attention.o_proj]
    assert sites["attention_output"].fold_into is None  # 4 heads over 2 KV heads: D stays online
    assert sites["mlp_input"].fold_into is block.post_attention_layernorm
    assert sites["mlp_output"].linears == [mlp.down_proj] and sites["mlp_output"].fold_into is mlp.up_proj
    assert tac_target(block, model.config) is attention.o_proj
    assert model.get_submodule(family.lm_head) is model.get_output_embeddings()
    assert family.vllm_site("model.layers.1.self_attn.qkv_proj") == "attention_input"
    assert family.vllm_site("model.layers.1.mlp.down_proj") == "mlp_output"
    assert family.vllm_site("lm_head") is None
    assert tokenizer.convert_ids_to_tokens(config["mask_token_id"]) == "<|mdm_mask|>"


def test_dream_predictions_are_the_raw_logits_shifted_once(tiny_dream_checkpoint):
    """Fails if the shift were dropped (row i = raw i) or applied twice (row i = raw i - 2)."""
    from starquant_plugin import load
    from starquant_plugin.diffusion import hf_logits_fn

    model, _ = load(tiny_dream_checkpoint[0])
    ids = torch.randint(0, 45, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 6:] = 49
    with torch.no_grad():
        raw = model(input_ids=ids).logits
        predictions = hf_logits_fn(model)(ids, None)
        windowed = hf_logits_fn(model)(ids, None, window=(5, 9))
    torch.testing.assert_close(predictions[:, 1:], raw[:, :-1])
    torch.testing.assert_close(predictions[:, 0], raw[:, 0])
    assert not torch.allclose(predictions[:, 2:], raw[:, 2:])
    torch.testing.assert_close(windowed, predictions[:, 5:9])


def test_dream_checkpoint_errors_name_the_key_or_tensor(tiny_dream_checkpoint):
    import json

    from starquant_plugin.checkpoint import validate_checkpoint

    directory, config, _ = tiny_dream_checkpoint
    path = directory / "config.json"
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "mask_token_id"}))
    with pytest.raises(InputError, match=r"config.json: .*mask_token_id"):
        validate_checkpoint(directory)
    path.write_text(json.dumps(dict(config, intermediate_size=128)))
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"):
        validate_checkpoint(directory)
