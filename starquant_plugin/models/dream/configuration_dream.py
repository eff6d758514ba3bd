"""Dream configuration, with the keys and defaults of the public Dream-v0-7B `config.json`."""

from typing import ClassVar

from transformers import PreTrainedConfig

__all__ = ["DreamConfig"]


class DreamConfig(PreTrainedConfig):
    r"""
    Configuration of a Dream masked-diffusion language model (Dream-org/Dream-v0-Base-7B /
    Instruct-7B, Dream-Coder, DiffuCoder): a Qwen2.5 network with bidirectional attention.
    The field names are the checkpoint's own, which are Qwen2's (`hidden_size`,
    `num_attention_heads`, ...). Checkpoints carry an `auto_map` for remote code: it is ignored,
    this class is used instead (no `trust_remote_code`).

    Args:
        hidden_size (`int`): hidden size.
        intermediate_size (`int`): intermediate size of the SwiGLU MLP.
        num_hidden_layers (`int`): decoder layers.
        num_attention_heads (`int`): query heads.
        num_key_value_heads (`int`, *optional*): key/value heads (GQA when smaller than
            `num_attention_heads`); `None` means `num_attention_heads`.
        vocab_size (`int`): rows of the embedding and the LM head.
        mask_token_id (`int`): id of the mask token that diffusion decoding fills in. Required:
            a config without it is refused (there is no model-independent default).
        rope_theta (`float`): rotary base.
        rope_scaling (`dict`, *optional*): must be `None` (plain rotary embeddings only).
        rms_norm_eps (`float`): RMSNorm epsilon.
        max_position_embeddings (`int`): longest canvas (prompt + generation) supported.
        tie_word_embeddings (`bool`): the LM head reads the embedding matrix (no `lm_head` tensor).
        hidden_act (`str`): must be `"silu"` (SwiGLU MLP).
    """

    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]
    # `DreamConfig()` has no mask token and is refused, so transformers must not build one to
    # diff a config against when saving it (every field is written instead).
    has_no_defaults_at_init: ClassVar[bool] = True

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-06
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    attention_dropout: float = 0.0
    mask_token_id: int | None = None
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # Dream checkpoints publish remote-code pointers; we serve this class instead.
        kwargs.pop("auto_map", None)
        # `head_dim` is derived (hidden_size / heads); a config.json that states it must agree.
        stated_head_dim = kwargs.pop("head_dim", None)
        super().__post_init__(**kwargs)
        self.validate_dream()
        if stated_head_dim is not None and stated_head_dim != self.head_dim:
            raise ValueError(
                f"DreamConfig.head_dim={stated_head_dim!r} is not supported (only hidden_size / num_attention_heads "
                f"= {self.head_dim})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_dream(self) -> None:
        """Raise a ValueError naming the field for settings this implementation does not run."""
        if self.mask_token_id is None:
            raise ValueError(
                "DreamConfig.mask_token_id is required: config.json must give the id of the mask token "
                "(151666 for Dream-v0-7B), which diffusion decoding fills in"
            )
        unsupported = {
            "hidden_act": (self.hidden_act, "silu"),
            "rope_scaling": (self.rope_scaling, None),
            "use_sliding_window": (self.use_sliding_window, False),
        }
        for field, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"DreamConfig.{field}={value!r} is not supported (only {supported!r})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"DreamConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"DreamConfig.num_key_value_heads={self.num_key_value_heads}: num_attention_heads="
                f"{self.num_attention_heads} is not divisible by it"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"DreamConfig.mask_token_id={self.mask_token_id} is outside the vocabulary "
                f"(vocab_size={self.vocab_size})"
            )
