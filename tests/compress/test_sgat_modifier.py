"""SGATModifier in real llm-compressor oneshot runs: YAML recipes, exactness, GPTQ after it."""

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.recipe import Recipe
from transformers import AutoModelForCausalLM

import starquant_plugin  # noqa: F401
from starquant_plugin.checkpoint.writer import starquant_config_of
from starquant_plugin.compress import SGATModifier
from starquant_plugin.compress.tac.base import _tail_masked
from starquant_plugin.data import CalibrationRecord, masked_calibration_samples
from tests.conftest import random_hub_tensors, tiny_config, tiny_tokenizer, write_hub_checkpoint

RECIPE = """
starquant_stage:
  starquant_modifiers:
    SGATModifier:
      rotation_block_size: 32
      smoothing_strength: 0.5
      activation_bits: 8
      weight_bits: 8
"""


@pytest.fixture
def tiny_setup(tmp_path):
    config = tiny_config(d_model=128, mlp_hidden_size=256, n_kv_heads=2)
    directory = write_hub_checkpoint(tmp_path / "tiny", config, random_hub_tensors(config, seed=11))
    tokenizer = tiny_tokenizer(config)
    records = [CalibrationRecord(f"abc{i}=", f"answer number {i}") for i in range(6)]
    samples = masked_calibration_samples(tokenizer, records, config["mask_token_id"], samples_per_record=2)
    return directory, config, tokenizer, Dataset.from_list(samples)


def test_registered_and_parsed_from_yaml():
    assert ModifierFactory._registered_registry["SGATModifier"] is SGATModifier
    recipe = Recipe.create_instance(RECIPE)
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, SGATModifier) and modifier.rotation_block_size == 32


@pytest.mark.parametrize(
    "field, value, message",
    [("rotation_block_size", 48, "power of two"), ("smoothing_strength", 1.5, "less than or equal to 1"),
     ("unknown_field", 1, "Extra inputs are not permitted")],
)
def test_bad_recipe_values_read_clearly(field, value, message):
    with pytest.raises(Exception, match=message):
        Recipe.create_instance(RECIPE.replace("activation_bits: 8", f"activation_bits: 8\n      {field}: {value}"))


def test_oneshot_sgat_is_exact_in_full_precision(tiny_setup, monkeypatch):
    """SGAT's transform and compensation alone leave the model unchanged. A recipe needs a weight
    quantizer after SGAT (test_recipe_rules.py); to see SGAT alone, the rule check is bypassed."""
    from starquant_plugin.compress.recipe_check import RecipeCheck
    from starquant_plugin.compress.sgat import base

    scheme = {"weight_bits": 8, "weight_group_size": None, "activation_bits": 8}
    monkeypatch.setattr(base, "check_session_recipe", lambda model: RecipeCheck(sgat_scheme=scheme))
    directory, config, tokenizer, dataset = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    probe = torch.tensor(dataset[0]["input_ids"])[None]
    with torch.no_grad():
        reference = model(probe).logits
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=RECIPE, num_calibration_samples=len(dataset),
            shuffle_calibration_samples=False)
    block = model.model.transformer.blocks[0]
    assert block.q_proj.sgat_shift.shape == (2, 128) and block.ff_out.sgat_compensation.shape == (2, 128)
    assert hasattr(block.attn_out, "sgat_smoothing")  # GQA: attention-output smoothing stays on line
    assert not torch.equal(block.q_proj.sgat_shift[0], block.q_proj.sgat_shift[1])  # per-state centres
    recorded = starquant_config_of(model).sgat
    assert recorded.rotation_block_size == 32 and recorded.online_smoothing == ["attention_output"]
    with torch.no_grad():
        torch.testing.assert_close(model(probe).logits, reference, atol=3e-4, rtol=3e-4)


def test_sgat_then_gptq_w8a8(tiny_setup, tmp_path):
    directory, config, tokenizer, dataset = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    probe = torch.tensor(dataset[1]["input_ids"])[None]
    with torch.no_grad():
        reference = model(probe).logits
    recipe = RECIPE + """    GPTQModifier:
      targets: ["Linear"]
      ignore: ["model.transformer.ff_out"]
      scheme: W8A8
"""
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(dataset),
            shuffle_calibration_samples=False)
    block = model.model.transformer.blocks[1]
    assert block.q_proj.quantization_scheme.weights.num_bits == 8 and hasattr(block.q_proj, "sgat_clip")
    with torch.no_grad():
        quantized = model(probe).logits
    error = ((quantized - reference).abs().mean() / reference.abs().mean()).item()
    assert 0 < error < 0.05


@pytest.mark.parametrize("objective", ["attention_output", "projection_output"])
def test_sgat_gptq_w4a8_then_tac_lowers_error_on_trajectories(tiny_setup, objective):
    from starquant_plugin.data import trajectory_canvases
    from starquant_plugin.diffusion import hf_logits_fn
    from starquant_plugin.quantization.runtime import attach_runtime

    directory, config, tokenizer, dataset = tiny_setup
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    recipe = RECIPE.replace("weight_bits: 8", "weight_bits: 4") + """    GPTQModifier:
      targets: ["Linear"]
      ignore: ["model.transformer.ff_out"]
      scheme: W4A8
    TACModifier:
      num_buckets: 2
      ridge: 0.01
      num_trajectories: 8
      validation_trajectories: 0
""" + f"      objective: {objective}\n"
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(dataset),
            shuffle_calibration_samples=False)
    attn_out = model.model.transformer.blocks[0].attn_out
    assert attn_out.tac_matrices.shape == (2, 4, 32, 32) and attn_out.tac_offsets.shape == (2, 128)
    settings = starquant_config_of(model).tac.model_dump()
    edges = settings.pop("bucket_edges")
    assert settings == {"block_size": 32, "num_buckets": 2, "ridge": 0.01}
    torch.testing.assert_close(attn_out.tac_bucket_edges, torch.tensor(edges))
    identity = torch.eye(32).expand(4, 32, 32)
    assert all(not torch.equal(attn_out.tac_matrices[k].float(), identity) for k in range(2))  # both buckets saw data

    rows = [torch.tensor(dataset[i]["input_ids"]) for i in range(len(dataset))]
    canvases = trajectory_canvases(hf_logits_fn(model), rows, config["mask_token_id"])

    def error():
        with torch.no_grad():
            return sum((model(c).logits - reference(c).logits).pow(2).mean().item() for c in canvases)

    with_tac = error()
    saved = [(b.attn_out, b.attn_out.tac_matrices, b.attn_out.tac_offsets) for b in model.model.transformer.blocks]
    for module, _, _ in saved:
        del module.tac_matrices, module.tac_offsets
    attach_runtime(model)
    without_tac = error()
    assert with_tac < without_tac, (with_tac, without_tac)


TAC_AFTER_W4A8 = RECIPE.replace("weight_bits: 8", "weight_bits: 4") + """    GPTQModifier:
      targets: ["Linear"]
      ignore: ["model.transformer.ff_out"]
      scheme: W4A8
    TACModifier:
      num_trajectories: 6
      validation_trajectories: 4
"""


def test_held_out_check_scores_a_share_of_the_masked_positions_beyond_the_logits_budget():
    from starquant_plugin.compress.tac.base import _scored_positions

    mask = 9
    canvases = [torch.tensor([[1, 2] + [mask] * n]) for n in (1, 4, 8, 16)]
    assert [int(s.sum()) for s in _scored_positions(canvases, mask, vocab_size=10)] == [1, 4, 8, 16]
    scored = _scored_positions(canvases, mask, vocab_size=10, budget=29 * 10 * 4 // 2)  # half of 29 positions
    assert [int(s.sum()) for s in scored] == [1, 2, 4, 8]  # each canvas keeps a share, at least one
    assert all(bool((c[s] == mask).all()) for c, s in zip(canvases, scored))  # masked positions only
    assert scored[3][0, 2:].nonzero()[:, 0].tolist() == [0, 2, 4, 6, 9, 11, 13, 15]  # evenly spaced


@pytest.mark.parametrize("validate_on", ["logits", "block_output"])
def test_tac_keeps_per_layer_and_bucket_the_strength_with_the_lowest_held_out_error(tiny_setup, validate_on):
    directory, config, tokenizer, dataset = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    recipe = Recipe.create_instance(TAC_AFTER_W4A8 + f"      num_buckets: 2\n      validate_on: {validate_on}\n")
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(dataset),
            shuffle_calibration_samples=False)
    (tac,) = [m for m in recipe.modifiers if type(m).__name__ == "TACModifier"]
    assert tac.strengths == [1.0, 0.5, 0.0] and len(tac.chosen_errors) == config["n_layers"]
    # Trajectories come from the rows masked most densely after their first mask (closest to a
    # decode of the whole answer): none left out is denser than one taken.
    mask = config["mask_token_id"]
    taken = [_tail_masked(r, mask) for r in tac._rows + tac._validation_rows]
    left = sorted(_tail_masked(torch.tensor(r), mask) for r in dataset["input_ids"])[: len(dataset) - len(taken)]
    assert len(taken) == 10 and min(taken) >= max(left)
    for chosen, errors, block in zip(tac.chosen_strengths, tac.chosen_errors, model.model.transformer.blocks):
        assert list(errors) == [1.0, 0.5, 0.0] and len(chosen) == 2
        for bucket, strength in enumerate(chosen):
            assert errors[strength][bucket] == min(e[bucket] for e in errors.values())
            if strength == 0.0:  # the bucket kept the identity
                eye = torch.eye(block.attn_out.tac_matrices.shape[-1]).expand_as(block.attn_out.tac_matrices[bucket])
                torch.testing.assert_close(block.attn_out.tac_matrices[bucket].float(), eye)


def test_tac_strength_zero_leaves_the_identity(tiny_setup):
    directory, config, tokenizer, dataset = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=TAC_AFTER_W4A8 + "      strengths: [0.0]\n",
            num_calibration_samples=len(dataset), shuffle_calibration_samples=False)
    for block in model.model.transformer.blocks:
        torch.testing.assert_close(block.attn_out.tac_matrices.float(), torch.eye(32).expand(1, 4, 32, 32))
        assert block.attn_out.tac_offsets.abs().max() == 0


def test_tac_strengths_outside_zero_one_read_clearly():
    with pytest.raises(Exception, match="strengths must lie in \\[0, 1\\]"):
        Recipe.create_instance(TAC_AFTER_W4A8 + "      strengths: [1.5, 0.0]\n")


def test_registration_is_lazy_and_works_in_either_import_order():
    import subprocess
    import sys

    for first, second in (("starquant_plugin", "llmcompressor"), ("llmcompressor", "starquant_plugin")):
        code = (
            f"import sys, {first}\n"
            "lazy = 'llmcompressor' in sys.modules\n"
            f"import {second}\n"
            "from llmcompressor.modifiers.factory import ModifierFactory\n"
            "print(lazy, sorted(ModifierFactory._registered_registry))\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        lazy, names = done.stdout.strip().splitlines()[-1].split(" ", 1)
        assert names == "['SGATModifier', 'TACModifier']"
        assert lazy == ("True" if first == "llmcompressor" else "False")


@pytest.mark.parametrize("family, validate_on, objective, logits_budget, validation_depth", [
    ("llada", "logits", "attention_output", None, 8), ("llada", "logits", "attention_output", None, 1),
    ("dream", "logits", "attention_output", 1, 2), ("llada", "block_output", "projection_output", None, 8),
])
def test_tac_layer_by_layer_fits_and_chooses_as_the_whole_model_forward(tmp_path, monkeypatch, family, validate_on,
                                                                         objective, logits_budget, validation_depth):
    """`layer_by_layer` (cached hidden states of both models, equal-length canvases batched, the
    full-precision reference read one block at a time) fits the same maps and measures the same
    held-out errors as whole forwards of two whole models on one canvas at a time, so it keeps the
    same strengths; Dream checks the family's logits shift and a sharded reference on that path, and
    the held-out check on a share of the masked positions (FP logits over budget: one per canvas);
    `validation_depth` below the depth checks layers on the logits from a shallower output."""
    from starquant_plugin.compress.tac import base

    if logits_budget is not None:
        monkeypatch.setattr(base, "REFERENCE_LOGITS_BYTES", logits_budget)
    from tests.conftest import random_dream_tensors, tiny_dream_config

    if family == "dream":
        config = tiny_dream_config(hidden_size=128, intermediate_size=256)
        directory = write_hub_checkpoint(tmp_path / "tiny", config, random_dream_tensors(config, seed=4), shards=2)
        layers = config["num_hidden_layers"]
    else:
        config = tiny_config(d_model=128, mlp_hidden_size=256, n_kv_heads=2, n_layers=3)
        directory = write_hub_checkpoint(tmp_path / "tiny", config, random_hub_tensors(config, seed=4))
        layers = config["n_layers"]
    tokenizer = tiny_tokenizer(config)
    records = [CalibrationRecord(f"abc{i}=", f"answer number {i}"[: 8 + i % 5]) for i in range(8)]
    dataset = Dataset.from_list(masked_calibration_samples(tokenizer, records, config["mask_token_id"], 2))
    runs, maps = {}, {}
    for cache in (True, False):
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        recipe = Recipe.create_instance(
            TAC_AFTER_W4A8.replace('ignore: ["model.transformer.ff_out"]', 'ignore: ["lm_head", "model.transformer.ff_out"]')
            + f"      num_buckets: 2\n      strengths: [1.0, 0.75, 0.5, 0.25, 0.0]\n      layer_by_layer: {str(cache).lower()}\n"
            + f"      validate_on: {validate_on}\n      objective: {objective}\n      validation_depth: {validation_depth}\n")
        oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(dataset),
                shuffle_calibration_samples=False)
        (tac,) = [m for m in recipe.modifiers if type(m).__name__ == "TACModifier"]
        runs[cache] = tac
        maps[cache] = [(b.tac_matrices.clone(), b.tac_offsets.clone()) for b in model.modules() if hasattr(b, "tac_matrices")]
    cached, full = runs[True], runs[False]
    assert len(cached.chosen_errors) == layers
    assert len({len(r) for r in cached._validation_rows}) > 1  # canvases of several lengths: several batches
    assert cached.chosen_strengths == full.chosen_strengths
    assert len(maps[True]) == layers
    for (matrices, offsets), (want_matrices, want_offsets) in zip(maps[True], maps[False]):
        torch.testing.assert_close(matrices, want_matrices, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(offsets, want_offsets, rtol=1e-3, atol=1e-5)
    for got, expected in zip(cached.chosen_errors, full.chosen_errors):
        for strength in expected:
            torch.testing.assert_close(torch.tensor(got[strength]), torch.tensor(expected[strength]), rtol=1e-3, atol=1e-7)
    # The strengths differ in error at every layer: a path that ignored the layer's map would not.
    assert all(len({round(e[0], 9) for e in errors.values()}) > 1 for errors in full.chosen_errors)
