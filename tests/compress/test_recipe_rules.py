"""The whole-recipe rules (compress/recipe_check.py): order, quantizer present, SGAT bits from the
scheme, servability; refused before calibration by `starquant quantize` and by `oneshot`."""

import json
import warnings
from pathlib import Path

import pytest
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from transformers import AutoModelForCausalLM

import starquant_plugin  # noqa: F401
from starquant_plugin.cli import main
from starquant_plugin.compress.recipe_check import RULES, CoreOnlyRecipeWarning, RecipeRuleError, check_recipe
from starquant_plugin.data import CalibrationRecord, masked_calibration_samples
from tests.conftest import random_hub_tensors, tiny_config, tiny_tokenizer, write_hub_checkpoint

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SGAT = "    SGATModifier: {rotation_block_size: 32}\n"
TAC = "    TACModifier: {num_buckets: 1, num_trajectories: 2, validation_trajectories: 0}\n"


def gptq(scheme: str) -> str:
    return f'    GPTQModifier: {{targets: ["Linear"], ignore: ["model.transformer.ff_out"], scheme: {scheme}}}\n'


def recipe(*modifiers: str) -> str:
    return "quant_stage:\n  quant_modifiers:\n" + "".join(modifiers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rules")
    config = tiny_config(d_model=128, mlp_hidden_size=256, n_kv_heads=2)
    directory = write_hub_checkpoint(tmp / "tiny", config, random_hub_tensors(config, seed=5))
    dataset = tmp / "calibration.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"abc{i}=", "answer": f"answer {i}"}) + "\n" for i in range(8)))
    return directory, dataset, AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.mark.parametrize(
    "modifiers, rule, named",
    [
        ((gptq("W8A8"), SGAT), "sgat-before-quantizer", "GPTQModifier (#1)"),
        ((SGAT,), "sgat-needs-quantizer", "SGATModifier"),
        ((TAC, SGAT, gptq("W4A8")), "tac-after-quantizer", "TACModifier (#1) comes before GPTQModifier (#3)"),
        ((TAC,), "tac-after-quantizer", "TACModifier has no weight quantizer"),
        ((SGAT.replace("32}", "32, weight_bits: 8, activation_bits: 8}"), gptq("W4A4")), "sgat-matches-scheme",
         "weight_bits=8"),
        ((SGAT, gptq("W4A16")), "sgat-scheme", "weight-only"),
        ((SGAT, gptq("FP8")), "sgat-scheme", "integer"),
        ((SGAT, gptq("W8A8"), "second_stage:\n  second_modifiers:\n" + SGAT), "one-starquant-modifier",
         "2 SGATModifier"),
    ],
)
def test_broken_rule_refused_before_the_model_loads(tiny, tmp_path, capsys, modifiers, rule, named):
    directory, dataset, _ = tiny
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe(*modifiers))
    output = tmp_path / "out"
    argv = ["quantize", str(directory), "--recipe", str(path), "--output", str(output), "--dataset", str(dataset)]
    assert main(argv) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error.startswith("starquant quantize: error: ") and str(path) in error
    assert f"[rule {rule}: {RULES[rule]}]" in error and named in error and not output.exists()


def test_scheme_decided_by_the_model(tiny):
    """A recipe whose groups differ is decided per SGAT site once the model is known: the blocks'
    W4A8 group reaches the sites, the head's W8A8 does not."""
    *_, model = tiny
    text = (RECIPES / "starquant_w4a8_head_w8a8.yaml").read_text()
    modifiers = Recipe.create_instance(text).modifiers
    assert check_recipe(modifiers).sgat_scheme is None  # groups differ: not decidable without the model
    check = check_recipe(modifiers, model)
    assert check.sgat_scheme == {"weight_bits": 4, "weight_group_size": 128, "activation_bits": 8}
    assert check.core_only == []
    # The same recipe with the block group in W8A8 while SGAT asks for 4-bit weights is refused.
    mismatched = text.replace("SGATModifier:", "SGATModifier:\n      weight_bits: 4").replace(
        "weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}",
        "weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}",
    )
    with pytest.raises(RecipeRuleError, match="sgat-matches-scheme"):
        check_recipe(Recipe.create_instance(mismatched).modifiers, model)


def test_quantizer_that_misses_every_sgat_site_is_refused(tiny):
    *_, model = tiny
    head_only = '    GPTQModifier: {targets: ["re:^model\\\\.transformer\\\\.ff_out$"], scheme: W8A8}\n'
    with pytest.raises(RecipeRuleError, match="no weight quantizer reaches the SGAT sites.*sgat-needs-quantizer"):
        check_recipe(Recipe.create_instance(recipe(SGAT, head_only)).modifiers, model)


@pytest.mark.parametrize(
    "path, core_only",
    [("starquant_w8a8.yaml", None), ("starquant_w4a8_head_embed_int8.yaml", None),
     ("starquant_w4a4.yaml", None), ("starquant_w4a4_head_embed_int8.yaml", None), ("baselines/gptq_w4a4.yaml", None),
     ("baselines/rotation_w8a8.yaml", "QuIPModifier")],
)
def test_servability_named_warning(tiny, path, core_only):
    *_, model = tiny
    modifiers = Recipe.create_instance(str(RECIPES / path)).modifiers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check = check_recipe(modifiers, model, source=path)
    named = [w for w in caught if issubclass(w.category, CoreOnlyRecipeWarning)]
    if core_only is None:
        assert check.core_only == [] and named == []
    else:
        assert any(core_only in reason for reason in check.core_only), check.core_only
        assert named and f"{path}: core-only checkpoint" in str(named[0].message)


def test_oneshot_users_get_the_same_rules(tiny):
    """The modifiers re-check the whole recipe on initialization, before any calibration pass."""
    directory, _, model = tiny
    config = json.loads((directory / "config.json").read_text())
    tokenizer = tiny_tokenizer(config)
    samples = masked_calibration_samples(tokenizer, [CalibrationRecord("abc=", "answer")], config["mask_token_id"], 2)
    with pytest.raises(RecipeRuleError, match="sgat-before-quantizer"):
        oneshot(model=model, tokenizer=tokenizer, dataset=Dataset.from_list(samples), recipe=recipe(gptq("W8A8"), SGAT),
                num_calibration_samples=2)
    assert not any(hasattr(m, "sgat_shift") for m in model.modules())  # nothing was calibrated


def test_sgat_bits_come_from_the_scheme(tiny, tmp_path):
    directory, dataset, _ = tiny
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe(SGAT, gptq("W4A8")))
    output = tmp_path / "out"
    assert main(["quantize", str(directory), "--recipe", str(path), "--output", str(output), "--dataset", str(dataset),
                 "--num-samples", "8"]) == 0
    sgat = json.loads((output / "config.json").read_text())["starquant_config"]["sgat"]
    assert (sgat["weight_bits"], sgat["weight_group_size"], sgat["activation_bits"]) == (4, 128, 8)


def test_every_rule_is_listed_in_the_docs():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    for rule, text in RULES.items():
        assert f"| `{rule}` | {text} |" in docs, rule
