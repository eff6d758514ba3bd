"""Which schemes the vLLM plugin serves, per device (checkpoint/schemes.py: one table for the recipe
check and the checkpoint check)."""

import pytest

from starquant_plugin.checkpoint.schemes import unservable_reason


def scheme(weight_bits=4, activation_bits=4, group_size=128, format="pack-quantized") -> dict:
    weights = {"num_bits": weight_bits, "type": "int", "symmetric": True}
    weights.update({"strategy": "group", "group_size": group_size} if weight_bits == 4 else {"strategy": "channel"})
    activations = {"num_bits": activation_bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return {"weights": weights, "input_activations": activations, "format": format}


@pytest.mark.parametrize("sgat_site", [True, False])
@pytest.mark.parametrize("on_cpu", [None, True, False])
def test_w4a4_is_served_at_every_linear_on_both_devices(sgat_site, on_cpu):
    assert unservable_reason(scheme(), sgat_site=sgat_site, on_cpu=on_cpu) is None


def test_int_quantized_w4a4_is_refused_on_cuda_only():
    """vLLM's WNA4Int reads pack-quantized weights; the CPU path reads either layout."""
    old = scheme(format="int-quantized")
    assert unservable_reason(old, sgat_site=True, on_cpu=True) is None
    assert unservable_reason(old, sgat_site=True, on_cpu=None) is None
    assert "reads pack-quantized weights" in unservable_reason(old, sgat_site=True, on_cpu=False)
    assert unservable_reason(scheme(activation_bits=8, format="int-quantized"), sgat_site=True, on_cpu=False) is None


def test_cpu_int4_weight_groups_are_those_of_the_packed_gemm():
    assert unservable_reason(scheme(group_size=64), sgat_site=False, on_cpu=True) is None
    reason = unservable_reason(scheme(group_size=16), sgat_site=False, on_cpu=True)
    assert "takes weight groups of 32, 64, 128, 256, this layer's are 16" in reason
    assert unservable_reason(scheme(group_size=16), sgat_site=False, on_cpu=False) is None


def test_int4_activations_need_int4_weights():
    assert "int4 activations are served with int4 weights only" in unservable_reason(
        scheme(weight_bits=8), sgat_site=True)
