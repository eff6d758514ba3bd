"""Which precisions this machine computes in hardware, and the dtype a model is served in.

Imports no vLLM. On a CPU without bf16 dot-product units (no AVX512-BF16, no AMX) a bf16 model
runs emulated: measured 6.7x slower than float32 at LLaDA-8B shapes on an AVX2-only EPYC
(docs/performance.md). So `dtype="auto"` serves a bf16 checkpoint in float32 there, and an
explicit bf16 gets the named `EmulatedPrecisionWarning`.
"""

import functools
import warnings
from pathlib import Path

__all__ = ["EmulatedPrecisionWarning", "cpu_flags", "hardware_precisions", "matmul_dtype", "serving_dtype"]


class EmulatedPrecisionWarning(UserWarning):
    """The requested dtype has no hardware units on this machine: it runs emulated, much slower."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where unreadable."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        return frozenset(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        return frozenset()


def hardware_precisions(flags: set[str] | None = None) -> dict[str, bool]:
    """Which precisions the machine computes in hardware (the GPU's where there is one): bf16 dot
    products (CPU: AVX512-BF16 or AMX-BF16; GPU: compute capability >= 8.0), int8 dot products
    (CPU: VNNI or AMX-INT8; GPU: >= 7.5). fp32 always."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {"fp32": True, "bf16": major >= 8, "int8": (major, minor) >= (7, 5)}
    flags = cpu_flags() if flags is None else flags
    return {"fp32": True, "bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
            "int8": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})}


def serving_dtype(requested: str, stored: str, precisions: dict[str, bool]) -> str:
    """The dtype to serve in: `requested`, or for `auto` the checkpoint's (`stored`) unless that is
    bf16 and the machine has no bf16 units (then float32). An explicit bf16 without them warns."""
    if requested == "auto":
        return "float32" if stored == "bfloat16" and not precisions["bf16"] else stored
    if requested == "bfloat16" and not precisions["bf16"]:
        warnings.warn("dtype bfloat16: this machine has no bf16 units (no AVX512-BF16 or AMX), so bf16 runs emulated, "
                      "several times slower than float32; dtype auto serves a bf16 checkpoint in float32 here",
                      EmulatedPrecisionWarning, stacklevel=3)
    return requested


def matmul_dtype(model_dtype, device_type: str, precisions: dict[str, bool] | None = None):
    """The dtype of the small matmuls STaR-Quant applies to activations (TAC's per-head maps):
    the model's, except on a CPU without units for it (bf16 without AVX512-BF16 or AMX, where a
    bf16 matmul ran ~28x slower than float32; float16 on any CPU), where it is float32."""
    import torch

    if device_type != "cpu" or model_dtype == torch.float32:
        return model_dtype
    precisions = hardware_precisions() if precisions is None else precisions
    return model_dtype if model_dtype == torch.bfloat16 and precisions["bf16"] else torch.float32
