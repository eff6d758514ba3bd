"""Every loader gets the quantized model or one clear error: `starquant_plugin.load`, the Auto
classes and `starquant eval` on a real `starquant quantize` checkpoint, intact and corrupted."""

import json

import pytest
import torch

import starquant_plugin
from starquant_plugin.assets import SHIPPED_MODEL
from starquant_plugin.checkpoint import validate_checkpoint
from starquant_plugin.errors import InputError
from starquant_plugin.loading import _check_loading_info
from tests.checkpoint_corruptions import CORRUPTIONS, copy_checkpoint
from tests.conftest import ROOT


def _probe(tokenizer, mask_token_id: int) -> torch.Tensor:
    """Prompts of two lengths, left-padded, answers partly masked (both token states, both TAC buckets)."""
    batch = tokenizer(["abc1=", "hello there ab="], padding=True, return_tensors="pt")
    answers = torch.full((2, 6), mask_token_id)
    answers[1, :2] = tokenizer("12", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(answers)], 1)
    return torch.cat([batch["input_ids"], answers], 1), attention_mask


def test_auto_classes_load_the_same_model_as_load(starquant_w8a8_checkpoint):
    from transformers import AutoModel, AutoModelForCausalLM

    reference, tokenizer = starquant_plugin.load(starquant_w8a8_checkpoint)
    input_ids, attention_mask = _probe(tokenizer, reference.config.mask_token_id)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        for auto in (AutoModelForCausalLM, AutoModel):
            model = auto.from_pretrained(starquant_w8a8_checkpoint)
            attn_out = model.model.transformer.blocks[0].attn_out
            assert hasattr(attn_out, "sgat_smoothing") and hasattr(attn_out, "tac_matrices")
            assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, expected)
        # The arguments a user passes for a local CPU load are honoured too.
        model = AutoModelForCausalLM.from_pretrained(starquant_w8a8_checkpoint, dtype="auto", device_map="cpu",
                                                     trust_remote_code=True, low_cpu_mem_usage=True)
        assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, expected)
    # SGAT matters: without its tensors (what plain transformers loaded) the logits are far off.
    stripped = starquant_plugin.LLaDAModelLM.from_pretrained_unrouted(starquant_w8a8_checkpoint)
    with torch.no_grad():
        plain = stripped(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (plain - expected).abs().mean() > 0.1 * expected.abs().mean()


@pytest.mark.parametrize(
    "arguments, named",
    [
        ({"device_map": "auto"}, "device_map='auto'"),
        ({"n_layers": 1}, r"a config that differs from its config\.json \(n_layers\)"),
        ({"quantization_config": {"quant_method": "compressed-tensors"}}, "quantization_config cannot override"),
        ({"use_safetensors": False}, "use_safetensors=False"),
        ({"dtype": torch.int8}, "dtype torch.int8 is not supported"),
        ({"output_attentions": True}, r"a config that differs from its config\.json \(output_attentions\)"),
        ({"key_mapping": {"a": "b"}}, r"from_pretrained\(\.\.\., key_mapping=\.\.\.\)"),
    ],
)
def test_auto_classes_refuse_arguments_they_cannot_honour(starquant_w8a8_checkpoint, arguments, named):
    from transformers import AutoModelForCausalLM

    with pytest.raises(InputError, match=rf"{named}.*load it with starquant_plugin\.load\("):
        AutoModelForCausalLM.from_pretrained(starquant_w8a8_checkpoint, **arguments)


def test_intact_checkpoints_validate(starquant_w8a8_checkpoint):
    checkpoint = validate_checkpoint(starquant_w8a8_checkpoint)
    assert len(checkpoint.schemes) == 7 * 2  # every block linear; the LM head is ignored
    assert "model.transformer.blocks.1.attn_out.sgat_smoothing" in checkpoint.starquant_shapes  # GQA: online
    validate_checkpoint(SHIPPED_MODEL)  # full precision, one file
    validate_checkpoint(ROOT / "examples" / "models" / "llada-gqa-6d")  # bf16, four shards


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_checkpoint_is_one_clear_error(starquant_w8a8_checkpoint, tmp_path, corruption):
    from transformers import AutoModelForCausalLM

    corrupt, message = CORRUPTIONS[corruption]
    directory = copy_checkpoint(starquant_w8a8_checkpoint, tmp_path / "checkpoint")
    corrupt(directory)
    for load in (starquant_plugin.load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(InputError, match=message) as error:
            load(directory)
        assert "\n" not in str(error.value)


def test_eval_reports_a_corrupted_checkpoint_in_one_line(starquant_w8a8_checkpoint, tmp_path, capsys):
    from starquant_plugin.cli import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": "abc1=", "answer": "answer 1"}) + "\n")
    for corruption in ("dropped ignore list", "zero-byte safetensors"):
        corrupt, message = CORRUPTIONS[corruption]
        directory = copy_checkpoint(starquant_w8a8_checkpoint, tmp_path / corruption.replace(" ", "-"))
        corrupt(directory)
        assert main(["eval", str(directory), "--tasks", str(tasks)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("starquant eval: error: "), lines
        assert __import__("re").search(message, lines[0])


def test_anything_transformers_reports_after_validation_is_an_error(starquant_w8a8_checkpoint):
    checkpoint = validate_checkpoint(starquant_w8a8_checkpoint)
    accounted = {"missing_keys": set(), "unexpected_keys": set(checkpoint.starquant_shapes), "mismatched_keys": set(),
                 "error_msgs": []}
    _check_loading_info(checkpoint, accounted)  # the STaR-Quant tensors are attached afterwards
    for key, value, named in [
        ("missing_keys", {"model.transformer.ln_f.weight"}, "missing tensor model.transformer.ln_f.weight"),
        ("unexpected_keys", {"model.transformer.extra"}, "unexpected tensor model.transformer.extra"),
        ("mismatched_keys", {("model.transformer.ln_f.weight", (3,), (128,))},
         r"tensor model.transformer.ln_f.weight has shape \(3,\), expected \(128,\)"),
    ]:
        with pytest.raises(InputError, match=rf"model\.safetensors: transformers reports {named}"):
            _check_loading_info(checkpoint, {**accounted, key: value | accounted[key]})
