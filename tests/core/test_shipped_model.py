"""The shipped model: hub layout, size, and the accuracy its model card claims."""

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from starquant_plugin.assets import SHIPPED_CALIBRATION_SET, SHIPPED_EVAL_SET, SHIPPED_MODEL
from starquant_plugin.cli import main
from starquant_plugin.evaluation import load_tasks

CARD = Path(__file__).resolve().parents[2] / "docs" / "shipped-model.md"
HUB_CONFIG_KEYS = set(json.loads((Path(__file__).parents[1] / "data" / "llada-8b-config.json").read_text()))


def documented_exact_match() -> float:
    match = re.search(r"held-out exact match: \*\*([0-9.]+)%\*\*", CARD.read_text())
    assert match, f"{CARD} must state 'held-out exact match: **NN.NN%**'"
    return float(match.group(1))


def test_hub_layout_and_size():
    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert HUB_CONFIG_KEYS - {"auto_map"} <= set(config), "every LLaDA config key is present"
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    with safe_open(SHIPPED_MODEL / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.transformer.wte.weight" in names and "model.transformer.ff_out.weight" in names
    assert "model.transformer.blocks.0.attn_out.weight" in names
    assert (SHIPPED_MODEL / "tokenizer.json").is_file() and (SHIPPED_MODEL / "tokenizer_config.json").is_file()
    total = sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir())
    assert total <= 25 * 2**20


def test_eval_and_calibration_sets_are_disjoint():
    evaluation = {e.prompt for e in load_tasks(SHIPPED_EVAL_SET)}
    calibration = {e.prompt for e in load_tasks(SHIPPED_CALIBRATION_SET)}
    assert len(evaluation) == 500 and not evaluation & calibration


@pytest.mark.slow
def test_accuracy_matches_the_model_card(tmp_path):
    out = tmp_path / "shipped.json"
    assert main(["eval", "--json", str(out), "--batch-size", "100"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 500 and set(result["per_task"]) == {"add", "sub"}
    assert abs(result["exact_match"] * 100 - documented_exact_match()) <= 1.0
    assert result["exact_match"] >= 0.95
