"""`starquant eval` / `starquant generate`: JSON shape, defaults, and every bad-input case."""

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from starquant_plugin.cli import main
from starquant_plugin.evaluation import load_tasks


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    rows = [
        {"prompt": "ab", "answer": "cde", "task": "x"},
        {"prompt": "abc", "answer": "fg", "task": "y"},
        {"prompt": "a", "answer": "h"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_writes_the_documented_json(tiny_checkpoint, tasks_file, tmp_path, capsys):
    directory = tiny_checkpoint[0]
    out = tmp_path / "result.json"
    assert main(["eval", str(directory), "--tasks", str(tasks_file), "--json", str(out), "--batch-size", "2"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"exact_match", "n", "per_task", "settings"}
    assert result["n"] == 3 and set(result["per_task"]) == {"x", "y", "default"}
    # Defaults: gen_length = longest answer in tokens (3 characters), steps = block_length = gen_length.
    settings = result["settings"]
    assert (settings["gen_length"], settings["steps"], settings["block_length"]) == (3, 3, 3)
    assert settings["remasking"] == "low_confidence" and settings["temperature"] == 0.0
    printed = capsys.readouterr().out
    assert "exact_match" in printed and "all" in printed


def test_eval_scores_exact_match_of_stripped_continuations(tiny_checkpoint, tmp_path):
    """Answers set to the model's own greedy output score 1.0; a wrong answer scores 0."""
    from starquant_plugin.diffusion import DiffusionSamplingConfig
    from starquant_plugin.evaluation import generate_texts
    from starquant_plugin import load as load_checkpoint

    directory, config, _ = tiny_checkpoint
    model, tokenizer = load_checkpoint(directory)
    prompts = ["abc", "hello", "q"]
    texts = generate_texts(model, tokenizer, prompts, DiffusionSamplingConfig(gen_length=4), config["mask_token_id"])
    path = tmp_path / "self.jsonl"
    rows = [{"prompt": p, "answer": f"  {t.strip()} ", "task": "own"} for p, t in zip(prompts, texts)]
    rows.append({"prompt": "abc", "answer": texts[0].strip() + "zz", "task": "wrong"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert main(["eval", str(directory), "--tasks", str(path), "--json", str(out), "--gen-length", "4"]) == 0
    result = json.loads(out.read_text())
    assert result["per_task"] == {"own": 1.0, "wrong": 0.0}


def _error(capsys) -> str:
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n', "tasks.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "answer": 3}\n', "tasks.jsonl:1: field 'answer' must be a string"),
        ('["a", "b"]\n', "tasks.jsonl:1: expected a JSON object"),
        ("\n\n", "no examples"),
    ],
)
def test_malformed_task_file(tiny_checkpoint, tmp_path, capsys, content, message):
    path = tmp_path / "tasks.jsonl"
    path.write_text(content)
    assert main(["eval", str(tiny_checkpoint[0]), "--tasks", str(path)]) == 2
    assert message in _error(capsys)


def test_missing_task_file(tiny_checkpoint, tmp_path, capsys):
    assert main(["eval", str(tiny_checkpoint[0]), "--tasks", str(tmp_path / "nope.jsonl")]) == 2
    assert "task file not found" in _error(capsys)


def test_model_directory_that_is_not_llada(tmp_path, tasks_file, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["eval", str(tmp_path / "llama"), "--tasks", str(tasks_file)]) == 2
    assert "model_type 'llama' is not a supported diffusion LLM family (supported: " in _error(capsys)
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "model directory not found" in _error(capsys)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gen-length", "0"], "gen_length must be a positive integer, got 0"),
        (["--gen-length", "-3"], "gen_length must be a positive integer, got -3"),
        (["--gen-length", "6", "--block-length", "4"], "block_length=4 does not divide gen_length=6"),
        (["--gen-length", "8", "--block-length", "4", "--steps", "3"], "steps=3 is not divisible by the number of blocks 2"),
        (["--batch-size", "0"], "batch_size must be positive"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
        (["--cfg-scale", "inf"], "cfg_scale must be a finite number >= 0, got inf"),
        (["--seed", str(10**23)], "seed must be an integer in"),
        (["--gen-length", "300"], "+ gen_length 300 exceeds max_sequence_length=256"),
    ],
)
def test_bad_decoding_settings(tiny_checkpoint, tasks_file, capsys, flags, message):
    assert main(["eval", str(tiny_checkpoint[0]), "--tasks", str(tasks_file), *flags]) == 2
    assert message in _error(capsys)
    if "batch" not in flags[0]:
        assert main(["generate", str(tiny_checkpoint[0]), "--prompt", "ab", *flags]) == 2
        assert message in _error(capsys)


def _one_line_error(capsys, command: str) -> str:
    lines = _error(capsys).strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert len(lines) == 1 and lines[0].startswith(f"starquant {command}: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("abéc", "--prompt: character 'é' (U+00E9) at position 2 is not in the model's vocabulary"),
        ("aBc", "--prompt: character 'B' (U+0042) at position 1 is not in the model's vocabulary"),
        ("ab<|mdm_mask|>c", "--prompt: contains the mask token '<|mdm_mask|>' (id 49) at position 2"),
        ("a\udcffb", "--prompt: character at position 1 is a lone surrogate (U+DCFF)"),  # undecodable argv byte
    ],
)
def test_generate_refuses_a_prompt_the_model_cannot_read(tiny_checkpoint, capsys, prompt, message):
    """Exit 2 and one line naming the character (or the mask token) and where it is, not a traceback
    and not a silent unknown token or a filled-in mask."""
    assert main(["generate", str(tiny_checkpoint[0]), "--prompt", prompt, "--gen-length", "2"]) == 2
    assert message in _one_line_error(capsys, "generate")


def test_eval_refuses_prompts_and_answers_the_model_cannot_read(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "tasks.jsonl"
    rows = [{"prompt": "ab", "answer": "c"}, {"prompt": "a?", "answer": "c"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["eval", str(tiny_checkpoint[0]), "--tasks", str(path)]) == 2
    assert f"{path}: example 2: prompt: character '?' (U+003F) at position 1" in _one_line_error(capsys, "eval")
    path.write_text(json.dumps({"prompt": "ab", "answer": "c!"}) + "\n")
    assert main(["eval", str(tiny_checkpoint[0]), "--tasks", str(path)]) == 2
    assert "example 1: answer: character '!' (U+0021) at position 1" in _one_line_error(capsys, "eval")


def test_model_without_tasks_is_a_usage_error(tiny_checkpoint, capsys):
    assert main(["eval", str(tiny_checkpoint[0])]) == 2
    error = _error(capsys)
    assert "--tasks FILE.jsonl is required" in error and "ships no eval.jsonl" in error


def test_console_script_generate(tiny_checkpoint):
    script = Path(sys.executable).with_name("starquant")
    done = subprocess.run(
        [str(script), "generate", str(tiny_checkpoint[0]), "--prompt", "abc", "--gen-length", "4"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip("\n")) <= 4  # at most 4 characters (specials skipped)


def test_load_tasks_keeps_order_and_default_task(tasks_file):
    examples = load_tasks(tasks_file)
    assert [e.task for e in examples] == ["x", "y", "default"]
    assert examples[0].answer == "cde"


def test_tensor_parallel_needs_the_vllm_backend(tiny_checkpoint, tasks_file, capsys):
    assert main(["eval", str(tiny_checkpoint[0]), "--tasks", str(tasks_file), "--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size needs --backend vllm" in _error(capsys)
    assert main(["generate", str(tiny_checkpoint[0]), "--prompt", "ab", "--backend", "vllm",
                 "--tensor-parallel-size", "0"]) == 2
    assert "--tensor-parallel-size must be positive, got 0" in _error(capsys)


@pytest.mark.skipif(find_spec("vllm") is not None, reason="vLLM is installed here: tests/serve runs the backend")
def test_vllm_commands_outside_the_serve_environment_say_where_to_run(tiny_checkpoint, capsys):
    assert main(["generate", str(tiny_checkpoint[0]), "--prompt", "ab", "--backend", "vllm"]) == 2
    assert "run it from the serve environment (.venv/serve)" in _error(capsys)
    assert main(["serve", str(tiny_checkpoint[0])]) == 2
    assert "serve needs vLLM" in _error(capsys)


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch, capsys):
    """`starquant eval ORG/NAME` resolves a model the Hugging Face cache holds (no download); an id
    it does not hold is one error naming `huggingface-cli download`."""
    import shutil

    from starquant_plugin.assets import SHIPPED_MODEL
    from starquant_plugin.cli import main

    snapshot = tmp_path / "hub" / "models--acme--tiny-llada" / "snapshots" / "0123abc"
    shutil.copytree(SHIPPED_MODEL, snapshot)
    (tmp_path / "hub" / "models--acme--tiny-llada" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-llada" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # `acme/tiny-llada` is no directory here
    out = tmp_path / "eval.json"
    assert main(["eval", "acme/tiny-llada", "--limit", "4", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 4
    assert main(["eval", "acme/absent", "--limit", "4"]) == 2
    assert "acme/absent: no such directory, and not in the local Hugging Face cache; download it first: " \
           "huggingface-cli download acme/absent" in capsys.readouterr().err
