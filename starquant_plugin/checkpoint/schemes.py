"""Which compressed-tensors schemes STaR-Quant can calibrate and the vLLM plugin can serve.

One table for the recipe check (compress side, before calibration) and the checkpoint check
(serve side, before an engine starts). Schemes are compressed-tensors `QuantizationScheme`s
as plain dicts (`{"weights": {...}, "input_activations": {...}}`), as in `config.json`.
"""

from enum import Enum

__all__ = ["describe_scheme", "sgat_scheme_problem", "unservable_reason"]


def _value(value):
    return value.value if isinstance(value, Enum) else value


def _args(scheme: dict, key: str) -> dict | None:
    args = scheme.get(key)
    if args is None:
        return None
    return {name: _value(value) for name, value in args.items()}


def describe_scheme(scheme: dict) -> str:
    """`W4A8 (int weights per group of 128, int8 activations per token, dynamic)`-style name."""
    weights, activations = _args(scheme, "weights"), _args(scheme, "input_activations")
    if weights is None:
        return "activations only"
    short = f"W{weights['num_bits']}A{activations['num_bits'] if activations else 16}"
    grouping = f"per group of {weights.get('group_size')}" if weights.get("strategy") == "group" else f"per {weights.get('strategy')}"
    text = f"{short} ({weights.get('type')} weights {grouping}"
    if activations is not None:
        dynamic = "dynamic" if activations.get("dynamic") else "static"
        text += f", {activations.get('type')}{activations['num_bits']} activations per {activations.get('strategy')} {dynamic}"
    return text + ")"


def sgat_scheme_problem(scheme: dict) -> str | None:
    """Why SGAT cannot calibrate for a site quantized with `scheme` (None: it can).

    SGAT shapes the input of a per-token integer activation quantizer: without one (weight-only
    schemes) it changes nothing that is quantized; static or float activation quantizers do not
    read its per-state clip.
    """
    weights, activations = _args(scheme, "weights"), _args(scheme, "input_activations")
    if weights is None or weights.get("type") != "int":
        return "SGAT needs integer weight quantization at its sites"
    if activations is None:
        return "SGAT needs activation quantization at its sites (a weight-only scheme has none: use the quantizer alone)"
    if activations.get("type") != "int" or not activations.get("dynamic") or activations.get("strategy") != "token":
        return "SGAT needs dynamic per-token integer activation quantization at its sites"
    return None


def unservable_reason(scheme: dict, sgat_site: bool) -> str | None:
    """Why the starquant vLLM plugin cannot serve a linear quantized with `scheme` (None: it can).

    Served: int8 per-channel or int4 grouped weights with dynamic per-token int8 activations
    (W8A8, W4A8); int4 grouped weights with dynamic per-token int4 activations (W4A4) at SGAT
    sites, whose 4-bit codes SGAT's quantizer produces (CPU: the plugin's packed-int4 GEMM); and
    weight-only int8/int4 (WNA16) outside SGAT sites (LM head, embedding).
    """
    weights, activations = _args(scheme, "weights"), _args(scheme, "input_activations")
    if weights is None:
        return "activation-only quantization is not served"
    if weights.get("type") != "int":
        return f"{weights.get('type')} weights are not served by the plugin"
    if weights["num_bits"] not in (4, 8) or not weights.get("symmetric", True):
        return f"int{weights['num_bits']} weights (symmetric={weights.get('symmetric')}) are not served"
    if activations is None:
        return "weight-only quantization of an SGAT site is not served" if sgat_site else None
    if (weights["num_bits"], weights.get("strategy")) not in ((8, "channel"), (4, "group")):
        return f"int{weights['num_bits']} {weights.get('strategy')} weights with activations are not served (W8A8 is per channel, W4A8 per group)"
    if activations.get("type") != "int" or activations["num_bits"] not in (4, 8):
        return f"{activations.get('type')}{activations['num_bits']} activations are not served"
    if activations["num_bits"] == 4 and not (sgat_site and weights["num_bits"] == 4):
        return ("int4 activations are served at SGAT sites with int4 weights only (vLLM's own int4-activation "
                "kernel is GPU-only)")
    if not activations.get("dynamic") or activations.get("strategy") != "token":
        return "only dynamic per-token activation quantization is served"
    return None
