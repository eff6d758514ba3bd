"""The rules a recipe with STaR-Quant modifiers must satisfy as a whole, checked before calibration.

Each modifier validates its own fields; these rules are about how the modifiers fit together,
which no single modifier sees. `quantize` checks them before the model loads (everything that
does not need the model) and the modifiers check them again on initialization, with the model,
so `oneshot` users get the same errors. The list is in docs/recipes.md.
"""

import warnings
from dataclasses import dataclass, field

from compressed_tensors.utils import match_named_modules
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin
from torch import nn

from ..checkpoint.schemes import describe_scheme, sgat_scheme_problem, unservable_reason
from ..errors import InputError
from ..models.family import family_of
from ..quantization.mappings import sgat_sites

__all__ = ["CoreOnlyRecipeWarning", "RecipeCheck", "RecipeRuleError", "RULES", "check_recipe", "check_session_recipe"]

# Rule name -> what it requires (printed in every error, listed in docs/recipes.md).
RULES = {
    "sgat-needs-quantizer": "SGATModifier needs a weight quantizer (GPTQModifier, QuantizationModifier, ...) after it: "
    "SGAT transforms the weights, the quantizer quantizes them",
    "sgat-before-quantizer": "SGATModifier comes before every weight quantizer: the quantizer must quantize (and GPTQ "
    "build its Hessians from) the SGAT-transformed weights and inputs",
    "tac-after-quantizer": "TACModifier comes after every weight quantizer: it fits the quantized model's attention "
    "outputs to the full-precision model's",
    "sgat-scheme": "SGAT's sites are quantized with integer weights and dynamic per-token integer activations, all with "
    "one scheme",
    "sgat-matches-scheme": "SGATModifier's weight_bits, weight_group_size and activation_bits equal the quantizer's "
    "scheme at the SGAT sites (leave them unset to take them from the scheme)",
    "one-starquant-modifier": "at most one SGATModifier and one TACModifier per recipe",
}


class RecipeRuleError(InputError):
    """A recipe breaks one of `RULES`; the message names the modifiers and the rule."""


class CoreOnlyRecipeWarning(UserWarning):
    """The recipe writes a checkpoint the core loads but the vLLM plugin cannot serve."""


@dataclass
class RecipeCheck:
    """What the whole-recipe check found."""

    # The scheme SGAT calibrates for: weight_bits, weight_group_size, activation_bits (None without
    # SGAT or, before the model is known, when the quantizers' groups do not decide it).
    sgat_scheme: dict | None = None
    core_only: list[str] = field(default_factory=list)  # why vLLM cannot serve the result


def _refuse(rule: str, detail: str, source: str) -> RecipeRuleError:
    return RecipeRuleError(f"{source}: {detail} [rule {rule}: {RULES[rule]}]")


def _weight_quantizers(modifiers: list[Modifier]) -> list[tuple[int, QuantizationMixin]]:
    return [
        (i, m) for i, m in enumerate(modifiers)
        if isinstance(m, QuantizationMixin) and any(g.weights is not None for g in m.resolved_config.config_groups.values())
    ]


def _scheme_dict(group) -> dict:
    return group.model_dump(include={"weights", "input_activations"}, exclude_none=True)


def _site_schemes(model: nn.Module, quantizers) -> dict[str, dict | None]:
    """Each SGAT-site linear's name -> the scheme the recipe gives it (the last match wins)."""
    names = {module: name for name, module in model.named_modules()}
    sites = [
        names[linear]
        for block in family_of(model.config).block_list(model)
        for site in sgat_sites(block, model.config).values()
        for linear in site.linears
    ]
    schemes: dict[str, dict | None] = dict.fromkeys(sites)
    wanted = set(sites)
    for _, quantizer in quantizers:
        for group in quantizer.resolved_config.config_groups.values():
            if group.weights is None:
                continue
            for name, _ in match_named_modules(model, group.targets, quantizer.ignore):
                if name in wanted:
                    schemes[name] = _scheme_dict(group)
    return schemes


def _sgat_settings(scheme: dict) -> dict:
    weights, activations = scheme["weights"], scheme["input_activations"]
    strategy = getattr(weights["strategy"], "value", weights["strategy"])
    return {
        "weight_bits": weights["num_bits"],
        "weight_group_size": weights.get("group_size") if strategy == "group" else None,
        "activation_bits": activations["num_bits"],
    }


def check_recipe(modifiers: list[Modifier], model: nn.Module | None = None, source: str = "recipe") -> RecipeCheck:
    """Check the rules; raise `RecipeRuleError` on the first broken one. With `model`, also the
    rules that need it (which scheme reaches the SGAT sites) and which layers vLLM could not serve:
    those are listed in the returned check and warned about (`CoreOnlyRecipeWarning`)."""
    from .sgat import SGATModifier
    from .tac import TACModifier

    check = RecipeCheck()
    sgat = [(i, m) for i, m in enumerate(modifiers) if isinstance(m, SGATModifier)]
    tac = [(i, m) for i, m in enumerate(modifiers) if isinstance(m, TACModifier)]
    if len(sgat) > 1 or len(tac) > 1:
        raise _refuse("one-starquant-modifier", f"{len(sgat)} SGATModifier and {len(tac)} TACModifier", source)
    quantizers = _weight_quantizers(modifiers)
    positions = ", ".join(f"{type(m).__name__} (#{i + 1})" for i, m in quantizers) or "none"
    if sgat:
        index = sgat[0][0]
        if not quantizers:
            raise _refuse("sgat-needs-quantizer", "SGATModifier has no weight quantizer after it", source)
        before = [f"{type(m).__name__} (#{i + 1})" for i, m in quantizers if i < index]
        if before:
            raise _refuse(
                "sgat-before-quantizer", f"SGATModifier (#{index + 1}) comes after {', '.join(before)}", source
            )
    if tac:
        index = tac[0][0]
        if not quantizers:
            raise _refuse("tac-after-quantizer", "TACModifier has no weight quantizer before it", source)
        after = [f"{type(m).__name__} (#{i + 1})" for i, m in quantizers if i > index]
        if after:
            raise _refuse("tac-after-quantizer", f"TACModifier (#{index + 1}) comes before {', '.join(after)}", source)

    # Which scheme reaches the SGAT sites: decided by the model, or without it when every
    # weight-quantizing group of the recipe has the same scheme.
    if model is not None:
        site_schemes = _site_schemes(model, quantizers)
        quantized = {name: scheme for name, scheme in site_schemes.items() if scheme is not None}
    else:
        groups = [_scheme_dict(g) for _, m in quantizers for g in m.resolved_config.config_groups.values() if g.weights]
        quantized = {"every quantized linear": groups[0]} if groups and all(g == groups[0] for g in groups) else {}
    if sgat and model is not None and not quantized:
        raise _refuse(
            "sgat-needs-quantizer", f"no weight quantizer reaches the SGAT sites (their targets/ignore leave every "
            f"block linear in full precision; quantizers: {positions})", source,
        )
    if sgat and quantized:
        distinct = {describe_scheme(s): name for name, s in quantized.items()}
        if len(distinct) > 1:
            raise _refuse(
                "sgat-scheme", "the SGAT sites get different schemes: "
                + "; ".join(f"{scheme} at {name}" for scheme, name in distinct.items()), source,
            )
        name, scheme = next(iter(quantized.items()))
        problem = sgat_scheme_problem(scheme)
        if problem:
            raise _refuse("sgat-scheme", f"{problem}; {name} gets {describe_scheme(scheme)} from {positions}", source)
        check.sgat_scheme = _sgat_settings(scheme)
        modifier = sgat[0][1]
        for key, value in check.sgat_scheme.items():
            set_value = getattr(modifier, key)
            if key in modifier.model_fields_set and set_value != value:
                raise _refuse(
                    "sgat-matches-scheme",
                    f"SGATModifier.{key}={set_value} but the quantizer's scheme at the SGAT sites has {value} "
                    f"({describe_scheme(scheme)})", source,
                )

    if model is not None:
        sites = set(site_schemes)
        for _, quantizer in quantizers:
            for group in quantizer.resolved_config.config_groups.values():
                scheme = _scheme_dict(group)
                for name, _ in match_named_modules(model, group.targets, quantizer.ignore) if group.weights else ():
                    reason = unservable_reason(scheme, sgat_site=bool(sgat) and name in sites)
                    if reason:  # one line per group: its first layer vLLM cannot serve
                        check.core_only.append(f"{name}: {describe_scheme(scheme)}: {reason}")
                        break
    transforms = [type(m).__name__ for m in modifiers if type(m).__name__ in ("QuIPModifier", "SpinQuantModifier")]
    if transforms:
        check.core_only.append(f"{', '.join(transforms)}: online Hadamard transforms are not served by the plugin")
    for reason in check.core_only if model is not None else ():
        # warnings.warn shows a message once per process: the modifiers re-check on initialization.
        warnings.warn(
            f"{source}: core-only checkpoint (`starquant eval` / `starquant_plugin.load` only; the vLLM plugin "
            f"cannot serve it): {reason}", CoreOnlyRecipeWarning, stacklevel=1,
        )
    return check


def check_session_recipe(model: nn.Module) -> RecipeCheck:
    """`check_recipe` on the recipe of the active llm-compressor session (for the modifiers'
    on_initialize, so `oneshot` users get the same errors as `starquant quantize`)."""
    from llmcompressor.core import active_session

    return check_recipe(list(active_session().lifecycle.recipe.modifiers), model)
