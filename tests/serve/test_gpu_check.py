"""scripts/gpu_check.py (`make gpu-check`) runs here on CPU with Triton's interpreter and small
shapes, so it is known to work before a GPU machine is lent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import quantize_with_cli
from starquant_plugin.assets import SHIPPED_MODEL

pytest.importorskip("triton", reason="Triton comes with the serve environment")

ROOT = Path(__file__).resolve().parents[2]


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                                       "HF_HUB_OFFLINE": "1"})


def test_gpu_check_runs_every_check_on_cpu(tmp_path):
    checkpoint = quantize_with_cli(SHIPPED_MODEL, "baselines/rtn_w4a4.yaml", tmp_path / "w4a4")
    out = tmp_path / "gpu-check.json"
    done = run_check("--device", "cpu", "--quick", "--checkpoint", str(checkpoint), "--json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["machine"]["device"] == "cpu"
    ops = {(r["op"], r["width"]): r for r in report["ops"]["rows"]}
    assert ops[("sgat_quantize", 512)]["rotation_block"] == 256 and ops[("sgat_quantize", 512)]["codes_mismatched"] == 0
    assert ops[("tac", 256)]["max_rel_error"] < 2e-2
    assert all(r["int32_products_exact"] and r["sgat_int8_ms"] > 0 for r in report["gemm"]["rows"])
    models = {Path(r["model"]).name: r for r in report["eval"]["rows"]}
    assert set(models) == {"llada-tiny-arith", "w4a4"}
    assert models["llada-tiny-arith"]["n"] == 20 and models["llada-tiny-arith"]["exact_match_cpu"] >= 0.9


def test_gpu_check_without_a_gpu_says_so():
    done = run_check("--device", "cuda")
    assert done.returncode == 2 and "torch sees no GPU" in done.stderr, done.stderr[-2000:]
