"""vLLM general plugin (entry point group `vllm.general_plugins`): run once in every vLLM
process (API server, engine core, each worker), so it must be idempotent."""

import torch

__all__ = ["register"]


def _init_cpu_amx() -> None:
    # bf16 attention on CPU uses AMX; a process that never asked the kernel for AMX dies with
    # an illegal instruction, so ask once per process (a no-op where AMX is absent).
    init_amx = getattr(torch.cpu, "_init_amx", None)
    if init_amx is not None:
        init_amx()


def _keep_float32_int8_gemms_on_onednn() -> None:
    """vLLM 0.32 on an AMX CPU routes int8 weights to its AMX GEMM (`int8_scaled_mm_with_quant`),
    which takes bf16/fp16 inputs only: a float32 model then fails at its first forward ("expect A
    to be bfloat16 or half"). Keep float32 models (default dtype while weights are processed) on
    the oneDNN int8 GEMM, which takes float32; bf16/fp16 models keep the AMX kernel."""
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    original = cpu.check_cpu_sgl_kernel
    if getattr(original, "_starquant_float32_guard", False):
        return

    def check_cpu_sgl_kernel(n: int, k: int, dtype: torch.dtype) -> bool:
        if dtype == torch.int8 and torch.get_default_dtype() == torch.float32:
            return False
        return original(n, k, dtype)

    check_cpu_sgl_kernel._starquant_float32_guard = True
    cpu.check_cpu_sgl_kernel = check_cpu_sgl_kernel


def register() -> None:
    """Register every model family (configs with transformers, models with vLLM), the `starquant`
    quantization method, and set up this process."""
    import starquant_plugin  # noqa: F401  (registers the families' configs with transformers' AutoConfig)
    from vllm import ModelRegistry

    from ..models.family import family_of, known_model_types

    from .quantization import config  # noqa: F401  (registers the `starquant` quantization method)

    _init_cpu_amx()
    if torch.cpu._is_amx_tile_supported():
        _keep_float32_int8_gemms_on_onednn()
    supported = set(ModelRegistry.get_supported_archs())
    for model_type in known_model_types():
        family = family_of(model_type)
        for architecture in family.architectures:
            if architecture not in supported:
                ModelRegistry.register_model(architecture, family.vllm_model_class)
