"""STaR-Quant: state-time consistent post-training quantization for diffusion LLMs."""

from .models import LLaDAConfig, LLaDAModelLM, register_with_transformers

__version__ = "0.1.0"

register_with_transformers()

__all__ = ["LLaDAConfig", "LLaDAModelLM", "__version__"]
