"""Files shipped inside the package: the default LLaDA-format model and its task sets."""

from pathlib import Path

__all__ = ["SHIPPED_MODEL", "SHIPPED_EVAL_SET", "SHIPPED_CALIBRATION_SET"]

SHIPPED_MODEL = Path(__file__).resolve().parent / "llada-tiny-arith"
SHIPPED_EVAL_SET = SHIPPED_MODEL / "eval.jsonl"
SHIPPED_CALIBRATION_SET = SHIPPED_MODEL / "calibration.jsonl"
