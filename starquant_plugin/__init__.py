"""STaR-Quant: state-time consistent post-training quantization for diffusion LLMs."""

from ._registration import register_modifiers_when_llmcompressor_loads
from .models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM, register_with_transformers

__version__ = "0.1.0"

register_with_transformers()
# SGATModifier/TACModifier become nameable in YAML recipes as soon as llm-compressor loads.
register_modifiers_when_llmcompressor_loads()

# After the registration: importing it routes local checkpoints of every family's `from_pretrained`
# (and so of the Auto classes) through `load`.
from .loading import load  # noqa: E402

__all__ = ["DreamConfig", "DreamModel", "LLaDAConfig", "LLaDAModelLM", "__version__", "load"]
