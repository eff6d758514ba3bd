"""LLaDA configuration, with the keys and defaults of the public LLaDA-8B `config.json`."""

from transformers import PreTrainedConfig

__all__ = ["LLaDAConfig"]


class LLaDAConfig(PreTrainedConfig):
    r"""
    Configuration of a LLaDA masked-diffusion language model (GSAI-ML/LLaDA-8B-Base/Instruct,
    LLaDA-1.5). The field names are the checkpoint's own (OLMo-style: `d_model`, `n_heads`,
    ...); the standard transformers names (`hidden_size`, `num_attention_heads`, ...) are
    aliases through `attribute_map`. Checkpoints carry an `auto_map` for remote code: it is
    ignored, this class is used instead (no `trust_remote_code`).

    Args:
        d_model (`int`): hidden size.
        n_heads (`int`): query heads.
        n_kv_heads (`int`, *optional*): key/value heads (GQA when smaller than `n_heads`);
            `None` means `n_heads`.
        n_layers (`int`): transformer blocks.
        mlp_hidden_size (`int`): intermediate size of the SwiGLU MLP.
        vocab_size (`int`): tokenizer vocabulary size.
        embedding_size (`int`): rows of the embedding and the LM head (>= `vocab_size`).
        mask_token_id (`int`): id of the mask token that diffusion decoding fills in.
        rope_theta (`float`): rotary base.
        rms_norm_eps (`float`): RMSNorm epsilon.
        max_sequence_length (`int`): longest canvas (prompt + generation) supported.
        weight_tying (`bool`): LM head shares the embedding matrix.
        scale_logits (`bool`): multiply logits by `1/sqrt(d_model)`.
        input_emb_norm (`bool`): multiply embeddings by `sqrt(d_model)`.
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    activation_type: str = "silu"
    alibi: bool = False
    alibi_bias_max: float = 8.0
    attention_dropout: float = 0.0
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool = False
    block_group_size: int = 1
    block_type: str = "llama"
    d_model: int = 4096
    embedding_dropout: float = 0.0
    embedding_size: int | None = 126464
    flash_attention: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    init_cutoff_factor: float | None = None
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float = 0.02
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    mask_token_id: int = 126336
    max_sequence_length: int = 4096
    mlp_hidden_size: int | None = 12288
    mlp_ratio: int = 4
    multi_query_attention: bool | None = None
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    precision: str | None = "amp_bf16"
    residual_dropout: float = 0.0
    rms_norm_eps: float = 1e-05
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    scale_logits: bool = False
    use_cache: bool = False
    vocab_size: int = 126464
    weight_tying: bool = False
    eos_token_id: int | list[int] | None = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.n_kv_heads is None:
            self.n_kv_heads = 1 if self.multi_query_attention else self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        # LLaDA checkpoints publish remote-code pointers; we serve this class instead.
        kwargs.pop("auto_map", None)
        self.tie_word_embeddings = self.weight_tying
        super().__post_init__(**kwargs)
        self.validate_llada()

    @property
    def num_key_value_heads(self) -> int:
        return self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate_llada(self) -> None:
        """Raise a ValueError naming the field for settings this implementation does not run."""
        unsupported = {
            "block_type": (self.block_type, "llama"),
            "layer_norm_type": (self.layer_norm_type, "rms"),
            "activation_type": (self.activation_type, "silu"),
            "alibi": (self.alibi, False),
            "rope": (self.rope, True),
            "attention_layer_norm": (self.attention_layer_norm, False),
            "include_bias": (self.include_bias, False),
        }
        for field, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"LLaDAConfig.{field}={value!r} is not supported (only {supported!r})")
        if self.d_model % self.n_heads:
            raise ValueError(f"LLaDAConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LLaDAConfig: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.embedding_size < self.vocab_size:
            raise ValueError(
                f"LLaDAConfig: embedding_size={self.embedding_size} is smaller than vocab_size={self.vocab_size}"
            )
