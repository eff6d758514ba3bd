"""`starquant bench`: speed and memory of quantized variants against the bf16 baseline (vLLM)."""

from .runner import VARIANTS, BenchSettings, format_decoding_table, format_table, run_bench, run_decoding_bench
from .shapes import SHAPES, base_checkpoint, write_random_checkpoint

__all__ = [
    "SHAPES",
    "VARIANTS",
    "BenchSettings",
    "base_checkpoint",
    "format_decoding_table",
    "format_table",
    "run_bench",
    "run_decoding_bench",
    "write_random_checkpoint",
]
