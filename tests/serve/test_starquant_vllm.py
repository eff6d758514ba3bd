"""STaR-Quant checkpoints served by vLLM through the `starquant` quantization method.

Checkpoints are written by the real compress side: `starquant quantize` from the compress
environment (`.venv/compress`, built by `make test` before this suite runs). Outputs are
compared with the core's fake-quant reload of the same checkpoint.
"""

import json
from pathlib import Path

import pytest
import torch

from starquant_plugin.assets import SHIPPED_EVAL_SET, SHIPPED_MODEL
from starquant_plugin.evaluation import load_tasks
from starquant_plugin import load as load_checkpoint
from starquant_plugin.quantization.runtime import attach_runtime, sequence_mask_ratio
from starquant_plugin.quantization.tac import mask_ratio_bucket
from tests.conftest import exact_match_by_backend, quantize_with_cli

pytest.importorskip("vllm", reason="the serve environment (.venv/serve) runs these")

from starquant_plugin.serving import DiffusionLLM  # noqa: E402
from starquant_plugin.serving.quantization.config import amx_int4_gemm  # noqa: E402
from starquant_plugin.serving.quantization.ops import int4_kernels, int8_amx  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


class _QuantizedOnFirstUse(dict):
    """bits -> the shipped model quantized with recipes/starquant_{bits}.yaml, written when first asked for."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = directory

    def __missing__(self, bits: str) -> Path:
        self[bits] = quantize_with_cli(SHIPPED_MODEL, f"starquant_{bits}.yaml", self.directory / bits)
        return self[bits]


@pytest.fixture(scope="module")
def shipped_checkpoints(tmp_path_factory):
    return _QuantizedOnFirstUse(tmp_path_factory.mktemp("starquant"))


def fixed_canvases(tokenizer, mask_token_id: int):
    """Prompts of different lengths, answers partly decoded: both token states, left padding."""
    examples = load_tasks(SHIPPED_EVAL_SET)[:16]
    batch = tokenizer([e.prompt for e in examples], padding=True, return_tensors="pt")
    answers = torch.full((len(examples), 5), mask_token_id)
    answers[8:, :3] = tokenizer("123", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    input_ids = torch.cat([batch["input_ids"], answers], 1)
    attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(answers)], 1)
    return input_ids, attention_mask


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().mean() / expected.abs().mean())


def served(directory: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, tensors: list[str] = (),
           **engine):
    """vLLM's model info, logits at the real positions, every block's output and `tensors`."""
    real = attention_mask.bool()
    with DiffusionLLM(directory, **engine) as llm:
        info = llm.model_info()
        logits = llm.logits(input_ids.tolist(), attention_mask.tolist())[real]
        block_outputs = llm.block_outputs(input_ids.tolist(), attention_mask.tolist())
        loaded = llm.tensors(list(tensors))[0] if tensors else {}
    return info, logits, block_outputs, loaded


def assert_matches_the_core(model, input_ids, attention_mask, logits, block_outputs, tolerance: float) -> float:
    """Every block's output and the logits within `tolerance` (mean relative error) of the core's on
    the same canvases; returns the logits' error."""
    real = attention_mask.bool()
    core_outputs = []
    hooks = [b.register_forward_hook(lambda m, a, o: core_outputs.append(o)) for b in model.model.transformer.blocks]
    try:
        with torch.no_grad():
            expected = model(input_ids=input_ids, attention_mask=attention_mask).logits[real]
    finally:
        for hook in hooks:
            hook.remove()
    layer_errors = [relative_error(v[real], c[real]) for v, c in zip(block_outputs, core_outputs, strict=True)]
    assert max(layer_errors) < tolerance, f"per-block mean relative error {layer_errors}"
    error = relative_error(logits, expected)
    assert error < tolerance, f"vLLM vs core fake-quant: mean relative logit error {error:.4f}"
    return error


def strip_sgat(model) -> None:
    for module in model.modules():
        for name in ("sgat_shift", "sgat_clip", "sgat_compensation"):
            if hasattr(module, name):
                delattr(module, name)
    attach_runtime(model)


# vLLM's int8 GEMM is not exact on every CPU: on AVX2 (no VNNI) oneDNN halves the int8
# weights to avoid int16 saturation, which costs ~1-2% per linear (measured in docs/serving.md).
# W4A4: a 4-bit code is 1/7 of a token's range, so the small differences between the two backends
# (bf16 group scales in the packed GEMM, summation order) flip codes that cost more than at 8 bits,
# and they grow with depth (measured per block on the shipped model: 0.6%, 0.9%, 1.3%, 3.5%).
TOLERANCE = {"w8a8": 0.05, "w4a8": 0.02, "w4a8_head_embed_int8": 0.05, "w4a4": 0.05}


@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a8_head_embed_int8", "w4a4"])
def test_starquant_checkpoint_logits_match_the_core_fake_quant(shipped_checkpoints, bits):
    directory = shipped_checkpoints[bits]
    groups = json.loads((directory / "config.json").read_text())["quantization_config"]["config_groups"].values()
    if bits.startswith("w4"):  # 4-bit weights are read packed (eight per int32), as written
        assert {g["format"] for g in groups if g["weights"]["num_bits"] == 4} == {"pack-quantized"}
    model, tokenizer = load_checkpoint(directory)
    input_ids, attention_mask = fixed_canvases(tokenizer, model.config.mask_token_id)
    real = attention_mask.bool()
    info, got, block_outputs, loaded = served(directory, input_ids, attention_mask, [
        "model.transformer.blocks.0.qkv_proj.sgat_compensation", "model.transformer.blocks.1.attn_out.tac_matrices",
        "model.transformer.blocks.1.attn_out.tac_bucket_edges"])
    assert info["quantization"] == "starquant"
    assert set(info["linear_methods"].values()) == {"StarQuantLinearMethod(CompressedTensorsLinearMethod)"}
    assert len(info["linear_methods"]) == 4 * model.config.n_layers
    # Embedding and head: int8 weights (the CPU lookup of the packed rows) and W8A8 here, bf16 otherwise.
    low_bit_ends = bits == "w4a8_head_embed_int8"
    assert info["embedding_method"] == ("WNA16EmbeddingMethod" if low_bit_ends else "UnquantizedEmbeddingMethod")
    assert info["lm_head_method"] == ("CompressedTensorsLinearMethod" if low_bit_ends else "UnquantizedEmbeddingMethod")
    if not torch.cuda.is_available():  # CPU: codes go straight into oneDNN's int8 GEMM / the packed int4 GEMM
        assert len(info["codes_gemm"]) == 4 * model.config.n_layers
        if bits.startswith("w4"):  # ours with AMX (groups of 128 here) or AVX512-VNNI / AVX2, torch's int4pack GEMM elsewhere
            assert set(info["codes_gemm"].values()) == {
                "starquant_amx_int4" if int8_amx() else "amx_int4" if amx_int4_gemm() else "vnni_int4" if int4_kernels()
                else "int4pack"}
        else:  # our AMX int8 GEMM with AMX, vLLM's oneDNN one elsewhere
            assert set(info["codes_gemm"].values()) == {"starquant_amx_int8" if int8_amx() else "onednn_int8"}
    block0 = model.model.transformer.blocks[0]
    expected_compensation = torch.cat([block0.q_proj.sgat_compensation, block0.k_proj.sgat_compensation,
                                       block0.v_proj.sgat_compensation], 1)
    torch.testing.assert_close(loaded["model.transformer.blocks.0.qkv_proj.sgat_compensation"], expected_compensation)
    attn_out = model.model.transformer.blocks[1].attn_out
    torch.testing.assert_close(loaded["model.transformer.blocks.1.attn_out.tac_matrices"], attn_out.tac_matrices)
    # The calibrated mask-ratio edges (config.json) reach vLLM, and these canvases use both buckets.
    torch.testing.assert_close(loaded["model.transformer.blocks.1.attn_out.tac_bucket_edges"], attn_out.tac_bucket_edges)
    ratios = sequence_mask_ratio(input_ids == model.config.mask_token_id, real)
    assert mask_ratio_bucket(ratios, attn_out.tac_bucket_edges).unique().tolist() == [0, 1]
    error = assert_matches_the_core(model, input_ids, attention_mask, got, block_outputs, TOLERANCE[bits])
    with torch.no_grad():
        strip_sgat(model)
        without_sgat = model(input_ids=input_ids, attention_mask=attention_mask).logits[real]
    # The rotated weights are meaningless without SGAT's input transform: vLLM must apply it.
    assert relative_error(got, without_sgat) > 20 * error


# vLLM's W4A8 CPU kernel is slow on AVX2 machines (248 s for 500 examples vs 30 s for the
# core's fake-quant, docs/serving.md): W4A8 is scored on the first 100 examples here.
@pytest.mark.parametrize("bits, limit", [("w8a8", 500), ("w4a8", 100), ("w4a4", 100)])
def test_vllm_exact_match_within_one_point_of_the_core(shipped_checkpoints, bits, limit, tmp_path):
    scores = exact_match_by_backend(shipped_checkpoints[bits], tmp_path, "--limit", str(limit))
    assert abs(scores["vllm"] - scores["core"]) <= 0.01, scores


def test_second_model_serves_as_it_scores_in_the_core(tmp_path):
    """examples/models/llada-gqa-6d: trained, GQA, bf16 in four shards, special ids 37-39, 7-token answers."""
    output = quantize_with_cli(ROOT / "examples" / "models" / "llada-gqa-6d", "starquant_w4a8.yaml", tmp_path / "w4a8")
    scores = exact_match_by_backend(output, tmp_path, "--limit", "200")
    assert scores["core"] > 0.95 and abs(scores["vllm"] - scores["core"]) <= 0.02, scores


def test_gqa_starquant_w4a4_checkpoint_with_tensor_parallelism(tmp_path):
    """examples/models/llada-gqa-6d (trained, GQA, bf16 shards) at W4A4 with 128-wide rotation blocks,
    so that TP=2 ranks hold whole blocks: GQA puts SGAT's smoothing online at the attention output;
    TP=2 splits every STaR-Quant tensor and the packed int4 weights. (A random-weight model is no
    test at W4A4: the core alone moves 32% from fp32 to bf16 at its first block.) Measured: TP 1 vs
    core 4.3%, TP 2 vs TP 1 4.8%, vs the core without the online smoothing 17.8%."""
    recipe = tmp_path / "starquant_w4a4_rotation128.yaml"
    recipe.write_text((ROOT / "recipes" / "starquant_w4a4.yaml").read_text().replace(
        "rotation_block_size: 256", "rotation_block_size: 128"))
    output = quantize_with_cli(ROOT / "examples" / "models" / "llada-gqa-6d", str(recipe), tmp_path / "w4a4")
    model, tokenizer = load_checkpoint(output)
    assert hasattr(model.model.transformer.blocks[0].attn_out, "sgat_smoothing")
    examples = load_tasks(output / "eval.jsonl")[:12]
    batch = tokenizer([e.prompt for e in examples], padding=True, return_tensors="pt")
    masks = torch.full((len(examples), 7), model.config.mask_token_id)
    input_ids = torch.cat([batch["input_ids"], masks], 1)
    attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(masks)], 1)
    real = attention_mask.bool()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits[real]
        for block in model.model.transformer.blocks:
            del block.attn_out.sgat_smoothing
        attach_runtime(model)
        without_smoothing = model(input_ids=input_ids, attention_mask=attention_mask).logits[real]
    logits, codes_gemm = {}, {}
    for tp in (1, 2):
        with DiffusionLLM(output, tensor_parallel_size=tp) as llm:
            logits[tp] = llm.logits(input_ids.tolist(), attention_mask.tolist())[real]
            codes_gemm[tp] = llm.model_info()["codes_gemm"]
    assert len(codes_gemm[1]) == len(codes_gemm[2]) == 4 * model.config.n_layers
    error = relative_error(logits[1], expected)
    assert error < 0.08, error
    assert relative_error(logits[1], without_smoothing) > 2 * error  # vLLM applies the online smoothing
    # TP=2 quantizes each rank's half of a row-parallel input per token: close, not identical.
    assert relative_error(logits[2], logits[1]) < 0.08


def test_starquant_w8a8_served_in_bf16_takes_the_codes_into_the_int8_gemm(shipped_checkpoints):
    """bf16 serving: on AMX CPUs the codes go into our AMX int8 GEMM (`starquant::int8_mm`, the
    scales and compensation in its epilogue), into vLLM's oneDNN int8 GEMM elsewhere. Every block
    linear takes that path, and the logits stay within bf16's distance of the float32 core fake-quant."""
    directory = shipped_checkpoints["w8a8"]
    model, tokenizer = load_checkpoint(directory)
    input_ids, attention_mask = fixed_canvases(tokenizer, model.config.mask_token_id)
    info, got, block_outputs, _ = served(directory, input_ids, attention_mask, dtype="bfloat16")
    assert info["dtype"] == "torch.bfloat16"
    assert len(info["codes_gemm"]) == 4 * model.config.n_layers
    assert set(info["codes_gemm"].values()) == {"starquant_amx_int8" if int8_amx() else "onednn_int8"}
    assert_matches_the_core(model, input_ids, attention_mask, got, block_outputs, 0.06)


@pytest.mark.parametrize("bits, tolerance", [("w4a8", 0.02), ("w4a4", 0.08)])
def test_plain_int4_checkpoints_are_served_with_their_activation_bits(bits, tolerance, tmp_path):
    """No starquant_config, packed int4 weights with quantized activations: vLLM's own CPU kernel for
    them (CPUWNA16) would run the activations unquantized. The plugin claims the checkpoint and runs
    the scheme's per-token codes on its packed int4 GEMM. W4A4 measured per block 1.0, 1.4, 2.1,
    6.4% from the core (fp32), which is itself 1.1, 1.6, 2.4, 6.7% from the same model in bf16."""
    directory = quantize_with_cli(SHIPPED_MODEL, f"baselines/rtn_{bits}.yaml", tmp_path / bits)
    model, tokenizer = load_checkpoint(directory)
    input_ids, attention_mask = fixed_canvases(tokenizer, model.config.mask_token_id)
    real = attention_mask.bool()
    info, got, block_outputs, _ = served(directory, input_ids, attention_mask)
    assert info["quantization"] == "starquant"
    assert len(info["codes_gemm"]) == 4 * model.config.n_layers
    error = assert_matches_the_core(model, input_ids, attention_mask, got, block_outputs, tolerance)
    with torch.no_grad():
        for module in model.modules():  # what a weight-only kernel computes: activations unquantized
            module.__dict__.pop("starquant_activation_bits", None)
        attach_runtime(model)
        unquantized_activations = model(input_ids=input_ids, attention_mask=attention_mask).logits[real]
    if bits == "w4a4":  # 8-bit activations are too close to unquantized ones (0.8%) to tell apart this way
        assert relative_error(got, unquantized_activations) > 2 * error


def test_plain_compressed_tensors_checkpoint_keeps_the_stock_path(tmp_path):
    """No starquant_config: vLLM's own compressed-tensors method serves it, unchanged."""
    directory = quantize_with_cli(SHIPPED_MODEL, "baselines/rtn_w8a8.yaml", tmp_path / "rtn")
    model, tokenizer = load_checkpoint(directory)
    input_ids, attention_mask = fixed_canvases(tokenizer, model.config.mask_token_id)
    real = attention_mask.bool()
    with DiffusionLLM(directory) as llm:
        info = llm.model_info()
        got = llm.logits(input_ids.tolist(), attention_mask.tolist())[real]
    assert info["quantization"] == "compressed-tensors"
    assert set(info["linear_methods"].values()) == {"CompressedTensorsLinearMethod"}
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits[real]
    assert relative_error(got, expected) < TOLERANCE["w8a8"]
