"""Diffusion LLM definitions for transformers, one package per model family, registered with
the family registry (`family.py`) and with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .dream import DreamConfig, DreamModel
from .dream.family import DREAM
from .family import SITE_NAMES, ModelFamily, SGATSiteSpec, family_of, known_model_types, register_family
from .llada import LLaDAConfig, LLaDAModelLM
from .llada.family import LLADA
from .loading import DTYPES, load_tokenizer, read_model_config

__all__ = [
    "DTYPES", "SITE_NAMES", "DreamConfig", "DreamModel", "LLaDAConfig", "LLaDAModelLM", "ModelFamily",
    "SGATSiteSpec", "family_of", "known_model_types", "load_tokenizer", "read_model_config", "register_family",
    "register_with_transformers",
]

for _family in (LLADA, DREAM):
    register_family(_family)


def register_with_transformers() -> None:
    """Make `Auto*.from_pretrained(dir)` load every registered family's checkpoints without
    trust_remote_code (the hub auto_maps of LLaDA and Dream send both AutoModel and
    AutoModelForCausalLM to the LM class; so do we).

    Idempotent: safe to call from every import of the package.
    """
    for model_type in known_model_types():
        family = family_of(model_type)
        AutoConfig.register(family.model_type, family.config_class, exist_ok=True)
        AutoModel.register(family.config_class, family.model_class, exist_ok=True)
        AutoModelForCausalLM.register(family.config_class, family.model_class, exist_ok=True)
