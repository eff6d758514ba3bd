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

from .loading import DTYPES, load_tokenizer, read_llada_config  # noqa: E402

__all__ += ["DTYPES", "load_llada", "load_tokenizer", "read_llada_config"]


def __getattr__(name: str):
    # `load_llada` is the older name of `starquant_plugin.load`, which lives above this package
    # (it needs checkpoint/); resolved on use so that models/ imports nothing from above.
    if name == "load_llada":
        from ..loading import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
