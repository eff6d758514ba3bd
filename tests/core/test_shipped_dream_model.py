"""The shipped Dream-format model: Dream's hub layout and the accuracy its model card claims."""

import json
import re
from pathlib import Path

import pytest

from starquant_plugin.assets import SHIPPED_DREAM_MODEL
from starquant_plugin.checkpoint.validate import read_safetensors_header
from starquant_plugin.cli import main
from starquant_plugin.evaluation import load_tasks
from tests.conftest import DREAM_7B_CONFIG

CARD = Path(__file__).resolve().parents[2] / "docs" / "shipped-model.md"
QWEN2_BLOCK_TENSORS = {
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
}


def test_dream_hub_layout():
    directory = SHIPPED_DREAM_MODEL
    config = json.loads((directory / "config.json").read_text())
    hub_keys = set(json.loads(DREAM_7B_CONFIG.read_text())) - {"auto_map", "torch_dtype"}
    assert hub_keys <= set(config), f"missing Dream config keys {hub_keys - set(config)}"
    assert config["model_type"] == "Dream" and config["architectures"] == ["DreamModel"]
    assert config["num_key_value_heads"] < config["num_attention_heads"] and config["dtype"] == "bfloat16"
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1
    names, dtypes = set(), set()
    for shard in shards:
        for name, stored in read_safetensors_header(directory / shard).items():
            names.add(name)
            dtypes.add(stored.dtype)
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{suffix}" for i in range(config["num_hidden_layers"]) for suffix in QWEN2_BLOCK_TENSORS
    }
    assert names == expected and dtypes == {"BF16"}
    tokenizer = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer["mask_token"] == "<|mask|>" and tokenizer["eos_token"] == tokenizer["pad_token"] == "<|endoftext|>"
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["mask_token_id"] == config["mask_token_id"] and generation["alg"] in (
        "origin", "maskgit_plus", "topk_margin", "entropy")
    evaluation = {e.prompt for e in load_tasks(directory / "eval.jsonl")}
    calibration = {e.prompt for e in load_tasks(directory / "calibration.jsonl")}
    assert len(evaluation) == 500 and not evaluation & calibration


def documented_exact_match() -> float:
    match = re.search(r"Dream-format held-out exact match: \*\*([0-9.]+)%\*\*", CARD.read_text())
    assert match, f"{CARD} must state 'Dream-format held-out exact match: **NN.NN%**'"
    return float(match.group(1))


@pytest.mark.slow
def test_dream_accuracy_matches_the_model_card(tmp_path):
    out = tmp_path / "dream.json"
    assert main(["eval", str(SHIPPED_DREAM_MODEL), "--json", str(out), "--batch-size", "100"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 500 and set(result["per_task"]) == {"reverse"}
    assert abs(result["exact_match"] * 100 - documented_exact_match()) <= 1.0
    assert result["exact_match"] >= 0.95
