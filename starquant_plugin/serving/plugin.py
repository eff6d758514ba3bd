"""vLLM general plugin (entry point group `vllm.general_plugins`): run once in every vLLM
process (API server, engine core, each worker), so it must be idempotent."""

import torch

__all__ = ["register", "LLADA_ARCHITECTURE", "LLADA_MODEL_CLASS"]

LLADA_ARCHITECTURE = "LLaDAModelLM"
LLADA_MODEL_CLASS = "starquant_plugin.serving.models.llada:LLaDAForDiffusionLM"


def _init_cpu_amx() -> None:
    # bf16 attention on CPU uses AMX; a process that never asked the kernel for AMX dies with
    # an illegal instruction, so ask once per process (a no-op where AMX is absent).
    init_amx = getattr(torch.cpu, "_init_amx", None)
    if init_amx is not None:
        init_amx()


def register() -> None:
    """Register LLaDA (config with transformers, model with vLLM), the `starquant`
    quantization method, and set up this process."""
    import starquant_plugin  # noqa: F401  (registers LLaDAConfig with transformers' AutoConfig)
    from vllm import ModelRegistry

    from .quantization import config  # noqa: F401  (registers the `starquant` quantization method)

    _init_cpu_amx()
    if LLADA_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(LLADA_ARCHITECTURE, LLADA_MODEL_CLASS)
