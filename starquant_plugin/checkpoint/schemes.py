"""Which compressed-tensors schemes STaR-Quant can calibrate and the vLLM plugin can serve.

One table for the recipe check (compress side, before calibration) and the checkpoint check
(serve side, before an engine starts). Schemes are compressed-tensors `QuantizationScheme`s
as plain dicts (`{"weights": {...}, "input_activations": {...}}`), as in `config.json`.
"""

from enum import Enum

__all__ = ["INT4_CPU_GROUPS", "PACKED_FORMAT", "describe_scheme", "enum_value", "sgat_scheme_problem", "unservable_reason"]

PACKED_FORMAT = "pack-quantized"
# Weight group sizes of torch's packed int4 CPU GEMM (`_weight_int4pack_mm_for_cpu`), which serves
# int4 weights with quantized activations on CPU (serving/quantization/config.py).
INT4_CPU_GROUPS = (32, 64, 128, 256)


def enum_value(value):
    """A compressed-tensors enum field (type, strategy, format) as its plain value."""
    return value.value if isinstance(value, Enum) else value


def _args(scheme: dict, key: str) -> dict | None:
    args = scheme.get(key)
    if args is None:
        return None
    return {name: enum_value(value) for name, value in args.items()}


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


def unservable_reason(scheme: dict, sgat_site: bool, on_cpu: bool | None = None) -> str | None:
    """Why the starquant vLLM plugin cannot serve a linear quantized with `scheme` (None: it can;
    `on_cpu`: the serving device, None when not known yet: the reasons that hold on both).

    Served: int8 per-channel or int4 grouped weights with dynamic per-token int8 activations
    (W8A8, W4A8); int4 grouped weights with dynamic per-token int4 activations (W4A4), on CPU by
    the plugin's packed-int4 GEMM fed 4-bit codes (SGAT's at its sites, plain per-token ones
    elsewhere), on CUDA by vLLM's WNA4Int scheme, which reads `pack-quantized` weights; and
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
    if activations["num_bits"] == 4 and weights["num_bits"] != 4:
        return "int4 activations are served with int4 weights only"
    if not activations.get("dynamic") or activations.get("strategy") != "token":
        return "only dynamic per-token activation quantization is served"
    if on_cpu is False and activations["num_bits"] == 4 and enum_value(scheme.get("format")) != PACKED_FORMAT:
        return (f"vLLM's int4-activation scheme (WNA4Int) reads {PACKED_FORMAT} weights, this layer is stored "
                f"{enum_value(scheme.get('format'))} (quantize it again with `starquant quantize`, which packs 4-bit weights)")
    if on_cpu and weights["num_bits"] == 4 and weights.get("group_size") not in INT4_CPU_GROUPS:
        return (f"the CPU int4 GEMM takes weight groups of {', '.join(map(str, INT4_CPU_GROUPS))}, this layer's are "
                f"{weights.get('group_size')}")
    return None
