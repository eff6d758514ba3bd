"""The LLaDA family (GSAI-ML/LLaDA-8B-Base/Instruct, LLaDA-1.5): hub module names, no logits shift."""

from ..family import ModelFamily, SGATSiteSpec
from .configuration_llada import LLaDAConfig
from .modeling_llada import LLaDAModelLM

__all__ = ["LLADA"]

LLADA = ModelFamily(
    model_type=LLaDAConfig.model_type,
    architectures=("LLaDAModelLM",),
    config_class=LLaDAConfig,
    model_class=LLaDAModelLM,
    blocks="model.transformer.blocks",
    sgat_sites={
        "attention_input": SGATSiteSpec(("q_proj", "k_proj", "v_proj"), "attn_norm"),
        "attention_output": SGATSiteSpec(("attn_out",), "v_proj", fold_through_attention=True),
        "mlp_input": SGATSiteSpec(("ff_proj", "up_proj"), "ff_norm"),  # ff_proj is the gate
        "mlp_output": SGATSiteSpec(("ff_out",), "up_proj"),
    },
    embedding="model.transformer.wte",
    lm_head="model.transformer.ff_out",
    logits_shift=0,
    vllm_model_class="starquant_plugin.serving.models.llada:LLaDAForDiffusionLM",
    vllm_blocks="model.transformer.blocks",
    vllm_embedding="model.transformer.wte",
    vllm_lm_head="model.transformer.ff_out",
    vllm_sites={
        "qkv_proj": "attention_input", "attn_out": "attention_output",
        "gate_up_proj": "mlp_input", "ff_out": "mlp_output",
    },
)
