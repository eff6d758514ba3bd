"""Files shipped inside the package: the default (LLaDA-format) model, a Dream-format model, and
their task sets."""

from pathlib import Path

__all__ = [
    "SHIPPED_CALIBRATION_SET", "SHIPPED_DREAM_MODEL", "SHIPPED_EVAL_SET", "SHIPPED_MODEL", "SHIPPED_MODELS",
]

SHIPPED_MODEL = Path(__file__).resolve().parent / "llada-tiny-arith"
SHIPPED_EVAL_SET = SHIPPED_MODEL / "eval.jsonl"
SHIPPED_CALIBRATION_SET = SHIPPED_MODEL / "calibration.jsonl"
# Dream format (Qwen2 layout, GQA, bf16 in shards): strings of 5-9 letters written backwards.
SHIPPED_DREAM_MODEL = Path(__file__).resolve().parent / "dream-tiny-reverse"
SHIPPED_MODELS = {"llada": SHIPPED_MODEL, "dream": SHIPPED_DREAM_MODEL}
