"""lm-evaluation-harness adapter (`starquant lm-eval`, model `starquant`) on local task files (no hub).

Real lm-eval (`simple_evaluate`, its task YAML, its metrics) on the shipped LLaDA model with the
core backend and on a STaR-Quant checkpoint with the vLLM backend; each number lm-eval reports is
checked against the project's own decoding and likelihood code on the same examples.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="the serve environment (.venv/serve) runs these")

from starquant_plugin.assets import SHIPPED_MODELS  # noqa: E402
from starquant_plugin.evaluation import load_tasks  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _wrong(answer: str) -> str:
    """Another answer of the same length: the last digit changed."""
    return answer[:-1] + str((int(answer[-1]) + 1) % 10)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two lm-eval tasks over the shipped LLaDA model's first held-out examples: `sq_arith_gen`
    (generate_until, exact match) and `sq_arith_mc` (multiple choice: the answer or a wrong one)."""
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    examples = load_tasks(SHIPPED_MODELS["llada"] / "eval.jsonl")[:12]
    (directory / "gen.jsonl").write_text("".join(
        json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in examples))
    (directory / "mc.jsonl").write_text("".join(
        json.dumps({"prompt": e.prompt, "choices": [_wrong(e.answer), e.answer] if i % 2 else [e.answer, _wrong(e.answer)],
                    "label": i % 2}) + "\n" for i, e in enumerate(examples)))
    length = max(len(e.answer) for e in examples)
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: prompt\ntarget_delimiter: ''\n"
    (directory / "sq_arith_gen.yaml").write_text(
        f"task: sq_arith_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: answer\n"
        f"generation_kwargs:\n  until: ['=']\n  max_gen_toks: {length}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (directory / "sq_arith_mc.yaml").write_text(
        f"task: sq_arith_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return directory, examples, length


def _evaluate(tasks_dir, model_args: dict, names: list[str], **options) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import starquant_plugin.evaluation.harness  # noqa: F401  (registers the model)

    return lm_eval.simple_evaluate(model="starquant", model_args=model_args, tasks=names, batch_size=8,
                                   task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True, **options)


@pytest.mark.slow
def test_core_backend_scores_what_the_project_decodes_and_estimates(tasks):
    """generate_until answers are `starquant eval`'s decoding of the same prompts; each choice's
    loglikelihood is minus the masked-NLL estimate and is_greedy whether greedy decoding gives it."""
    import torch

    from starquant_plugin import load
    from starquant_plugin.diffusion import DiffusionSamplingConfig, diffusion_generate, hf_logits_fn, masked_nll
    from starquant_plugin.evaluation import core_generate_fn, exact_match

    directory, examples, length = tasks
    model_dir = SHIPPED_MODELS["llada"]
    results = _evaluate(directory, {"pretrained": str(model_dir), "block_length": length, "mc_samples": 32},
                        ["sq_arith_gen", "sq_arith_mc"])
    model, tokenizer = load(model_dir)
    expected = core_generate_fn(model, tokenizer, model.config.mask_token_id)(
        [e.prompt for e in examples], DiffusionSamplingConfig(gen_length=length, block_length=length))
    samples = sorted(results["samples"]["sq_arith_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [text.split("=")[0] for text in expected]
    matches = sum(exact_match(text, e.answer) for text, e in zip(expected, examples))
    assert results["results"]["sq_arith_gen"]["exact_match,none"] == pytest.approx(matches / len(examples))
    assert matches >= 10  # the shipped model solves these

    mc = sorted(results["samples"]["sq_arith_mc"], key=lambda s: s["doc_id"])
    logits_fn = hf_logits_fn(model)
    for sample in mc[:3]:
        prompt = torch.tensor(tokenizer(sample["doc"]["prompt"])["input_ids"])
        for choice, (loglikelihood, greedy) in zip(sample["doc"]["choices"], (r[0] for r in sample["resps"])):
            answer = torch.tensor(tokenizer(choice, add_special_tokens=False)["input_ids"])
            assert loglikelihood == pytest.approx(-masked_nll(logits_fn, prompt, answer, model.config.mask_token_id,
                                                              32, 16, 0), rel=1e-5)
            decoded = diffusion_generate(logits_fn, prompt[None], model.config.mask_token_id, DiffusionSamplingConfig(
                gen_length=len(answer), steps=len(answer))).generated[0]
            assert greedy == torch.equal(decoded, answer)
    assert results["results"]["sq_arith_mc"]["acc,none"] >= 10 / 12  # the right answer is the more likely

    # --apply_chat_template: the shipped template renders the user message as the bare prompt with
    # its BOS, tokenized without adding another: the same answers.
    chat = _evaluate(directory, {"pretrained": str(model_dir), "block_length": length}, ["sq_arith_gen"],
                     apply_chat_template=True)
    chat_samples = sorted(chat["samples"]["sq_arith_gen"], key=lambda s: s["doc_id"])
    assert tokenizer.bos_token in chat_samples[0]["arguments"][0][0]  # the rendered context
    assert [s["resps"][0][0] for s in chat_samples] == [s["resps"][0][0] for s in samples]


@pytest.mark.slow
def test_rolling_loglikelihood_of_a_document_longer_than_the_canvas():
    """lm-eval's rolling windows (each a context token and up to max_length - 1 tokens) fit the
    canvas; the document's log-likelihood is the sum over its windows, a finite negative number."""
    import math
    from types import SimpleNamespace

    from starquant_plugin.evaluation.harness import StarQuantLM

    lm = StarQuantLM(pretrained=str(SHIPPED_MODELS["llada"]), mc_samples=16)
    document = "".join(e.prompt + e.answer for e in load_tasks(SHIPPED_MODELS["llada"] / "eval.jsonl")[:80])
    assert len(lm.tok_encode(document, add_special_tokens=False)) > 2 * lm.max_length
    (total,) = lm.loglikelihood_rolling([SimpleNamespace(args=(document,))])
    assert math.isfinite(total) and total < 0


@pytest.mark.slow
def test_vllm_backend_on_a_starquant_checkpoint_and_the_command_line(tasks, starquant_w8a8_checkpoint, tmp_path):
    """`starquant lm-eval` (lm-eval's own command line) on a STaR-Quant W8A8 checkpoint served by
    vLLM: its per-sample answers are the engine's decoding, its loglikelihoods the core's estimate on
    the same checkpoint within kernel rounding; settings it cannot honour are refused by name."""
    import torch

    from starquant_plugin import load
    from starquant_plugin.diffusion import hf_logits_fn, masked_nll

    directory, examples, length = tasks
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "starquant_plugin.cli", "lm-eval", "--model", "starquant", "--model_args",
         f"pretrained={starquant_w8a8_checkpoint},backend=vllm,block_length={length},mc_samples=16",
         "--tasks", "sq_arith_gen,sq_arith_mc", "--include_path", str(directory), "--limit", "4",
         "--batch_size", "4", "--log_samples", "--output_path", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sq_arith_gen" in done.stdout and "exact_match" in done.stdout  # lm-eval's table
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "starquant"
    mc = [json.loads(line) for path in out.rglob("samples_sq_arith_mc_*.jsonl") for line in path.read_text().splitlines()]
    assert len(mc) == 4
    model, tokenizer = load(starquant_w8a8_checkpoint)
    for sample in mc[:2]:
        prompt = torch.tensor(tokenizer(sample["doc"]["prompt"])["input_ids"])
        for choice, response in zip(sample["doc"]["choices"], sample["resps"]):
            answer = torch.tensor(tokenizer(choice, add_special_tokens=False)["input_ids"])
            core = -masked_nll(hf_logits_fn(model), prompt, answer, model.config.mask_token_id, 16, 16, 0)
            assert float(response[0][0]) == pytest.approx(core, rel=0.05)

    refused = subprocess.run(
        [sys.executable, "-m", "starquant_plugin.cli", "lm-eval", "--model", "starquant", "--model_args",
         f"pretrained={starquant_w8a8_checkpoint},mc_samples=20,mc_batch_size=16", "--tasks", "sq_arith_mc",
         "--include_path", str(directory)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert refused.returncode == 2
    assert "model_args mc_samples=20 must be a multiple of mc_batch_size=16" in refused.stderr


def test_generation_options_diffusion_cannot_honour_are_refused_by_name():
    from starquant_plugin.errors import InputError
    from starquant_plugin.evaluation.harness import StarQuantLM

    lm = StarQuantLM.__new__(StarQuantLM)  # the settings logic only: no model
    lm.decoding = {"block_length": 32, "steps": None, "remasking": "low_confidence", "threshold": None,
                   "cfg_scale": 0.0, "temperature": 0.0}
    lm.seed = 0
    assert lm.sampling(40, {"do_sample": False}).gen_length == 64  # whole blocks
    assert lm.sampling(8, {}).block_length == 8
    assert lm.sampling(64, {"steps": 32, "temperature": 0.5, "top_p": 0.9}).steps == 32
    with pytest.raises(InputError, match="gen_kwargs num_beams, repetition_penalty: not supported by diffusion"):
        lm.sampling(8, {"num_beams": 2, "repetition_penalty": 1.1})
    with pytest.raises(InputError, match="decoding settings: steps=3 is not divisible by the number of blocks 2"):
        lm.sampling(64, {"steps": 3})
