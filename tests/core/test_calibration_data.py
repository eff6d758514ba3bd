"""Masked calibration simulation."""

import json

import pytest

from starquant_plugin.data import CalibrationRecord, load_calibration_records, masked_calibration_samples
from tests.conftest import tiny_config, tiny_tokenizer


def test_answers_masked_at_spread_ratios_prompt_untouched():
    config = tiny_config()
    tokenizer = tiny_tokenizer(config)
    mask = config["mask_token_id"]
    records = [CalibrationRecord("abc=", "defghijk"), CalibrationRecord("plain text here")]
    samples = masked_calibration_samples(tokenizer, records, mask, samples_per_record=4, seed=0)
    assert len(samples) == 8
    prompt_len = len(tokenizer("abc=")["input_ids"])
    answer_len = 8 + 1  # answer characters + EOS
    counts = []
    for sample in samples[:4]:
        ids = sample["input_ids"]
        assert mask not in ids[:prompt_len]
        counts.append(ids.count(mask))
    # Stratified ratios: one per quarter of (0, 1], so the counts grow and reach the whole answer.
    assert counts == sorted(counts) and counts[-1] >= answer_len * 3 // 4 and counts[0] <= answer_len // 4 + 1
    for sample in samples[4:]:
        assert sample["input_ids"][0] != mask and mask in sample["input_ids"]
    again = masked_calibration_samples(tokenizer, records, mask, samples_per_record=4, seed=0)
    assert again == samples


def test_calibration_file_errors(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match="calib.jsonl:1: expected string fields"):
        load_calibration_records(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match="calib.jsonl:1: not valid JSON"):
        load_calibration_records(path)
    path.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    assert load_calibration_records(path) == [CalibrationRecord("x"), CalibrationRecord("p", "a")]
    with pytest.raises(ValueError, match="calibration file not found"):
        load_calibration_records(tmp_path / "missing.jsonl")
