"""vLLM adapter: plugin, the families' models from vLLM layers, diffusion decoding engine.

Importing this package does not import vLLM; `DiffusionLLM` does when it is built.
"""

from .engine import DiffusionCompletion, DiffusionLLM, DiffusionProgress, DiffusionSamplingParams

__all__ = ["DiffusionLLM", "DiffusionSamplingParams", "DiffusionCompletion", "DiffusionProgress"]
