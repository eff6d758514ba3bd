"""The recipes, unchanged, on a second trained LLaDA-format checkpoint (examples/models/llada-gqa-6d).

Unlike the shipped model it has grouped-query attention (8 heads, 2 KV heads), bf16 weights
in four safetensors shards, special-token ids 37-39 of a 40-token vocabulary, MLP width 768
and 6-digit operands (7-token answers).
Trained by scripts/train_shipped_model.py (its TRAINING.json holds the arguments);
docs/llada-gqa-6d/results.md has the full comparison.
"""

import json
from pathlib import Path

import pytest

from starquant_plugin.cli import main
from tests.conftest import eval_exact_match

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "models" / "llada-gqa-6d"
LIMIT = "200"


def exact_match(directory: Path, out: Path) -> float:
    return eval_exact_match(directory, out, "--tasks", str(MODEL / "eval.jsonl"), "--limit", LIMIT)


def test_second_model_is_what_it_claims():
    config = json.loads((MODEL / "config.json").read_text())
    assert (config["n_heads"], config["n_kv_heads"], config["dtype"]) == (8, 2, "bfloat16")
    assert (config["mask_token_id"], config["eos_token_id"], config["vocab_size"]) == (39, 38, 40)
    assert len(json.loads((MODEL / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(MODEL.glob("model-*-of-*.safetensors"))) == 4


@pytest.mark.parametrize("recipe, points", [("starquant_w8a8.yaml", 0.5), ("starquant_w4a8.yaml", 2.0)])
def test_starquant_recipes_hold_their_targets_on_the_second_model(recipe, points, tmp_path):
    full_precision = exact_match(MODEL, tmp_path / "fp.json")
    assert full_precision >= 0.95  # 100% on all 500 held-out examples in float32 (docs/llada-gqa-6d/results.md)
    output = tmp_path / "quantized"
    assert main(["quantize", str(MODEL), "--recipe", str(ROOT / "recipes" / recipe), "--output", str(output)]) == 0
    block = json.loads((output / "config.json").read_text())["starquant_config"]
    assert block["mask_token_id"] == 39 and block["tac"]["num_buckets"] == 2
    quantized = exact_match(output, tmp_path / "q.json")
    assert quantized >= full_precision - points / 100, (recipe, full_precision, quantized)
