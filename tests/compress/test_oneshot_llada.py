"""llm-compressor's oneshot traces and quantizes LLaDA through the sequential pipeline."""

import json

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import starquant_plugin  # noqa: F401
from tests.conftest import random_hub_tensors, tiny_config, tiny_tokenizer, write_hub_checkpoint


def test_gptq_oneshot_sequential_pipeline_on_llada(tmp_path):
    config = tiny_config(d_model=128, mlp_hidden_size=256, n_kv_heads=2)  # GQA; group size 128 divides
    directory = write_hub_checkpoint(tmp_path / "tiny", config, random_hub_tensors(config))
    tokenizer = tiny_tokenizer(config)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(0, 40, (6 + i,), generator=generator)
        ids[-3:] = config["mask_token_id"]  # calibration canvases contain masked positions
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)})
    output = tmp_path / "w4a16"
    model = AutoModelForCausalLM.from_pretrained(directory)
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=Dataset.from_list(rows),
        recipe=[GPTQModifier(targets="Linear", scheme="W4A16", ignore=["model.transformer.ff_out"])],
        pipeline="sequential",
        num_calibration_samples=8,
        output_dir=str(output),
    )
    saved = json.loads((output / "config.json").read_text())
    assert saved["model_type"] == "llada"
    assert saved["quantization_config"]["quant_method"] == "compressed-tensors"
    with safe_open(output / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for i in range(config["n_layers"]):
        for proj in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
            assert f"model.transformer.blocks.{i}.{proj}.weight_packed" in names
    assert "model.transformer.ff_out.weight" in names  # the LM head stays in full precision
    assert "model.transformer.ff_out.weight_packed" not in names
