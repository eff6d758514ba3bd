"""Which vLLM scheme the `starquant` method builds for int4 weights, per device (no engine: the
selection is vLLM's own `_get_scheme_from_parts`, with the plugin's CPU rewrite)."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

pytest.importorskip("vllm", reason="the serve environment (.venv/serve) runs these")

from starquant_plugin.serving.quantization.config import (  # noqa: E402
    STARQUANT_METHOD,
    StarQuantCompressedTensorsConfig,
)

WEIGHTS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)


def activations(bits: int) -> QuantizationArgs:
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token", dynamic=True)


def config(activation_bits: int, format: str = "pack-quantized") -> dict:
    return {"quant_method": "compressed-tensors", "format": format, "ignore": [], "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": WEIGHTS.model_dump(), "input_activations": activations(activation_bits).model_dump(),
        "format": format}}}


def selected(activation_bits: int, cuda: bool, monkeypatch) -> object:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    method = StarQuantCompressedTensorsConfig.from_config(config(activation_bits))
    return method._get_scheme_from_parts(WEIGHTS, activations(activation_bits), format="pack-quantized",
                                         layer_name="model.transformer.blocks.0.q_proj")


def test_cuda_w4a4_gets_vllms_int4_activation_scheme(monkeypatch):
    scheme = selected(4, cuda=True, monkeypatch=monkeypatch)
    assert type(scheme).__name__ == "CompressedTensorsWNA4Int"
    assert scheme.input_quant.num_bits == 4 and scheme.quant_format == "pack-quantized"


@pytest.mark.parametrize("activation_bits", [4, 8])
def test_cpu_int4_weights_get_the_w4a8_layout_the_plugin_repacks(activation_bits, monkeypatch):
    """On CPU both build WNA8Int's packed int32 weights; `StarQuantLinearMethod` repacks them for
    torch's int4 GEMM and feeds it codes of the checkpoint's own activation bits."""
    scheme = selected(activation_bits, cuda=False, monkeypatch=monkeypatch)
    assert type(scheme).__name__ == "CompressedTensorsWNA8Int"


@pytest.mark.parametrize(
    "quant_config, claimed",
    [(config(4), True), (config(8), True), (config(8, "int-quantized"), True),
     ({**config(8), "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
         "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
         "input_activations": activations(8).model_dump()}}}, False)],
    ids=["w4a4", "w4a8", "w4a8-int-quantized", "w8a8"],
)
def test_plain_checkpoints_with_int4_weights_and_activations_are_claimed(quant_config, claimed):
    """A plain checkpoint of a served family is claimed only where vLLM's CPU path would run its
    activations unquantized (int4 weights with quantized activations); W8A8 keeps vLLM's method."""
    from starquant_plugin.models.llada import LLaDAConfig

    method = StarQuantCompressedTensorsConfig.override_quantization_method(quant_config, None, LLaDAConfig())
    assert method == (STARQUANT_METHOD if claimed else None)
