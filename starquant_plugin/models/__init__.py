"""Diffusion LLM definitions for transformers, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .llada import LLaDAConfig, LLaDAModelLM

__all__ = ["LLaDAConfig", "LLaDAModelLM", "register_with_transformers"]


def register_with_transformers() -> None:
    """Make `Auto*.from_pretrained(dir)` load LLaDA checkpoints without trust_remote_code.

    Idempotent: safe to call from every import of the package.
    """
    AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
    # LLaDA's hub auto_map sends both AutoModel and AutoModelForCausalLM to the LM class.
    AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
    AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

from .loading import load_llada, load_tokenizer, read_llada_config  # noqa: E402

__all__ += ["load_llada", "load_tokenizer", "read_llada_config"]
