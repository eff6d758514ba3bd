"""Model families: one registry entry per `model_type` says where everything is in that family.

SGAT, TAC, the fake-quant runtime, the checkpoint reader and writer, the recipe checks and the
vLLM adapter ask the family of a config (`family_of`) for blocks, sites, head counts, the
logits shift, the mask id and the LM-head and embedding names; none of them names a module of
a family. A family is declared beside its model files (`models/<family>/family.py`) and
registered in `models/__init__.py` (docs/adding-a-model-family.md).
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError

__all__ = [
    "SITE_NAMES", "ModelFamily", "SGATSiteSpec", "family_of", "known_model_types", "register_family",
]

# The SGAT input sites of every block, in application order (a site's producer may be an
# earlier site's linear: the value projection, the up projection).
SITE_NAMES = ("attention_input", "attention_output", "mlp_input", "mlp_output")


@dataclass(frozen=True)
class SGATSiteSpec:
    """One SGAT input site of a block, by module names relative to the block.

    Attributes:
        linears: the linears reading the site's input (they share its transform).
        fold_into: the module producing that input, whose output channels absorb the smoothing
            D (an RMSNorm, or a linear's rows); None: D is applied online.
        fold_through_attention: `fold_into` is the value projection and the input is the
            attention output: D folds into its rows only when every query head has its own
            key/value head (under GQA one value row feeds several query heads' outputs).
    """

    linears: tuple[str, ...]
    fold_into: str | None = None
    fold_through_attention: bool = False


@dataclass(frozen=True)
class ModelFamily:
    """Everything that differs between diffusion-LLM families (docs/adding-a-model-family.md).

    Attributes:
        model_type: `config.json`'s `model_type`.
        architectures: the hub's `architectures` names of its checkpoints.
        config_class / model_class: the transformers classes (no remote code).
        blocks: module path of the block list in the transformers model.
        sgat_sites: site name (`SITE_NAMES`) -> `SGATSiteSpec`.
        tac_site: the site whose input is the attention output (TAC corrects it).
        embedding / lm_head: module paths in the transformers model (recipes' `ignore`).
        logits_shift: 0 when the logits at position i predict token i (LLaDA); 1 when the logits
            at position i - 1 do (Dream; position 0 predicts itself from its own logits).
        vllm_model_class: `module:Class` of the vLLM model registered for `architectures`.
        vllm_sites: linear name relative to a vLLM block (q/k/v and gate/up fused) -> site name.
        vllm_blocks / vllm_embedding / vllm_lm_head: module paths in the vLLM model.
    """

    model_type: str
    architectures: tuple[str, ...]
    config_class: type
    model_class: type
    blocks: str
    sgat_sites: dict[str, SGATSiteSpec]
    embedding: str
    lm_head: str
    logits_shift: int
    vllm_model_class: str
    vllm_sites: dict[str, str]
    vllm_blocks: str
    vllm_embedding: str
    vllm_lm_head: str
    tac_site: str = "attention_output"
    _vllm_pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if tuple(self.sgat_sites) != SITE_NAMES:
            raise ValueError(f"family {self.model_type!r}: sgat_sites must be {SITE_NAMES} in order")
        if self.logits_shift not in (0, 1):
            raise ValueError(f"family {self.model_type!r}: logits_shift must be 0 or 1")
        names = "|".join(re.escape(name) for name in self.vllm_sites)
        pattern = re.compile(rf"(?:^|\.){re.escape(self.vllm_blocks)}\.\d+\.({names})$")
        object.__setattr__(self, "_vllm_pattern", pattern)

    # -- the transformers model ---------------------------------------------------------------
    def block_list(self, model: nn.Module) -> nn.ModuleList:
        """The blocks of a transformers model of this family, in order. The family's forward calls
        each block with the hidden states as its first positional argument and uses the tensor it
        returns as the next block's input (TAC's layer-by-layer runs rely on it)."""
        return model.get_submodule(self.blocks)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks}.{index}"

    @property
    def tac_target(self) -> str:
        """The linear (relative to a block) whose input TAC corrects: the attention output's reader."""
        (linear,) = self.sgat_sites[self.tac_site].linears
        return linear

    def online_smoothing_sites(self, config) -> list[str]:
        """Sites whose smoothing cannot be folded upstream and is applied online, for `config`."""
        heads, kv_heads, _ = self.heads(config)
        grouped = kv_heads != heads
        return [
            name for name, spec in self.sgat_sites.items()
            if spec.fold_into is None or (spec.fold_through_attention and grouped)
        ]

    @staticmethod
    def heads(config) -> tuple[int, int, int]:
        """(query heads, key/value heads, head_dim) of `config`."""
        return config.num_attention_heads, config.num_key_value_heads, config.head_dim

    @staticmethod
    def mask_token_id(config) -> int:
        return config.mask_token_id

    # -- predictions --------------------------------------------------------------------------
    def raw_window(self, window: tuple[int, int]) -> tuple[int, int]:
        """The raw-logit positions the predictions for positions `window` = (lo, hi) are read from."""
        lo, hi = window
        if not self.logits_shift:
            return lo, hi
        return (lo - 1, hi - 1) if lo > 0 else (0, max(hi - 1, 1))

    def predictions(self, raw: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits [batch, positions, vocab] whose row i predicts the token at position i (of
        `window`, when given), from the model's raw logits (of `raw_window(window)`)."""
        if not self.logits_shift:
            return raw
        if window is None:
            return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
        lo, hi = window
        return raw if lo > 0 else torch.cat([raw[:, :1], raw], dim=1)[:, :hi]

    def logits_fn(self, forward: Callable) -> Callable:
        """Wrap `forward(input_ids, attention_mask, window) -> raw logits` (window = raw positions
        or None) into the sampler's `logits_fn(input_ids, attention_mask, window=None)` of predictions."""

        def logits_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, window=None) -> torch.Tensor:
            raw = forward(input_ids, attention_mask, None if window is None else self.raw_window(window))
            return self.predictions(raw, window)

        return logits_fn

    # -- the vLLM model -----------------------------------------------------------------------
    def vllm_site(self, prefix: str) -> str | None:
        """The SGAT site of a vLLM layer prefix (`model.layers.3.self_attn.qkv_proj`), None if none."""
        found = self._vllm_pattern.search(prefix)
        return None if found is None else self.vllm_sites[found.group(1)]


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> None:
    """Add a family (idempotent for the same entry)."""
    _FAMILIES[family.model_type] = family


def known_model_types() -> list[str]:
    return sorted(_FAMILIES)


def family_of(config_or_model_type) -> ModelFamily:
    """The family of a config (object or `config.json` dict) or a `model_type`; InputError naming
    the model_type and the known ones when no family is registered for it."""
    if isinstance(config_or_model_type, str):
        model_type = config_or_model_type
    elif isinstance(config_or_model_type, dict):
        model_type = config_or_model_type.get("model_type")
    else:
        model_type = getattr(config_or_model_type, "model_type", None)
    family = _FAMILIES.get(model_type)
    if family is None:
        raise InputError(
            f"model_type {model_type!r} is not a supported diffusion LLM family (supported: {', '.join(known_model_types())})"
        )
    return family
