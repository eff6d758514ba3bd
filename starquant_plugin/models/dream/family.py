"""The Dream family (Dream-v0-Base/Instruct-7B, Dream-Coder, DiffuCoder): Qwen2 module names,
logits shifted by one (the raw logits at position i - 1 predict token i)."""

from ..family import ModelFamily, SGATSiteSpec
from .configuration_dream import DreamConfig
from .modeling_dream import DreamModel

__all__ = ["DREAM"]

DREAM = ModelFamily(
    model_type=DreamConfig.model_type,
    architectures=("DreamModel",),
    config_class=DreamConfig,
    model_class=DreamModel,
    blocks="model.layers",
    sgat_sites={
        "attention_input": SGATSiteSpec(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        "attention_output": SGATSiteSpec(("self_attn.o_proj",), "self_attn.v_proj", fold_through_attention=True),
        "mlp_input": SGATSiteSpec(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        "mlp_output": SGATSiteSpec(("mlp.down_proj",), "mlp.up_proj"),
    },
    embedding="model.embed_tokens",
    lm_head="lm_head",
    logits_shift=1,
    vllm_model_class="starquant_plugin.serving.models.dream:DreamForDiffusionLM",
    vllm_blocks="model.layers",
    vllm_embedding="model.embed_tokens",
    vllm_lm_head="lm_head",
    vllm_sites={
        "self_attn.qkv_proj": "attention_input", "self_attn.o_proj": "attention_output",
        "mlp.gate_up_proj": "mlp_input", "mlp.down_proj": "mlp_output",
    },
)
