"""STaR-Quant: state-time consistent post-training quantization for diffusion LLMs."""

from importlib.util import find_spec

from .models import LLaDAConfig, LLaDAModelLM, register_with_transformers

__version__ = "0.1.0"

register_with_transformers()

# In the compress environment, make SGATModifier/TACModifier nameable in YAML recipes.
if find_spec("llmcompressor") is not None:
    from . import compress  # noqa: F401  (registers the modifiers with ModifierFactory)

__all__ = ["LLaDAConfig", "LLaDAModelLM", "__version__"]
