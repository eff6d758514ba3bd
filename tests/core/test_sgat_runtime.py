"""SGAT written into a LLaDA model: exact in full precision, quantized path, padding, GQA."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from starquant_plugin.quantization import build_sgat_site, fake_quantize_per_token, fake_quantize_weight
from starquant_plugin.quantization.apply import apply_sgat_site
from starquant_plugin.quantization.hadamard import rotation_block_for
from starquant_plugin.quantization.mappings import sgat_sites
from starquant_plugin.quantization.runtime import attach_runtime, detach_runtime
from tests.conftest import random_hub_tensors, tiny_config, write_hub_checkpoint


def calibration_batch(config, batch=6, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (batch, seq), generator=g)
    masked = torch.rand(batch, seq, generator=g) < torch.linspace(0.1, 0.9, batch)[:, None]
    masked[:, :3] = False
    return ids.masked_fill(masked, config["mask_token_id"])


def calibrate_sgat(model, ids, rotation_block=16, activation_bits=None, weight_bits=8):
    """Capture each site's input per block, build the site, and write it (block order)."""
    config = model.config
    for block in model.model.transformer.blocks:
        sites = sgat_sites(block, config)
        captured = {}
        handles = [block.register_forward_pre_hook(lambda m, a: captured.__setitem__("states", a[3]))]
        for name, site in sites.items():
            handles.append(site.linears[0].register_forward_pre_hook(
                lambda m, a, name=name: captured.__setitem__(name, a[0].detach().clone())))
        with torch.no_grad():
            model(ids)
        for handle in handles:
            handle.remove()
        states = captured["states"].reshape(-1)
        for name, site_modules in sites.items():
            site = build_sgat_site(
                captured[name].reshape(-1, captured[name].shape[-1]), states,
                [linear.weight for linear in site_modules.linears],
                rotation_block_for(captured[name].shape[-1], rotation_block),
                activation_bits=activation_bits, quantize_weight=lambda w: fake_quantize_weight(w, weight_bits),
            )
            apply_sgat_site(site_modules, site)
    return attach_runtime(model)


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_sgat_in_model_is_exact_in_full_precision(tmp_path, n_kv_heads):
    config = tiny_config(n_kv_heads=n_kv_heads)
    directory = write_hub_checkpoint(tmp_path / "m", config, random_hub_tensors(config, seed=n_kv_heads))
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = calibration_batch(config)
    padded_mask = torch.ones_like(ids)
    padded_mask[0, :4] = 0
    with torch.no_grad():
        reference = model(ids).logits
        reference_padded = model(ids, attention_mask=padded_mask).logits
    count = calibrate_sgat(model, ids)
    assert count == 7 * config["n_layers"]
    assert hasattr(model.model.transformer.blocks[0].attn_out, "sgat_smoothing") == (n_kv_heads != 4)
    test_ids = calibration_batch(config, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(model(ids, attention_mask=padded_mask).logits, reference_padded, atol=2e-4, rtol=2e-4)
        detach_runtime(model)
        assert (model(test_ids).logits - reference[:, :]).abs().max() > 1e-2  # weights are transformed: hooks needed
    attach_runtime(model)


def relative_error(logits, reference):
    return ((logits - reference).abs().mean() / reference.abs().mean()).item()


def test_quantized_sgat_model_beats_plain_per_token_quantization(tmp_path):
    config = tiny_config()
    directory = write_hub_checkpoint(tmp_path / "m", config, random_hub_tensors(config, seed=7))
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = calibration_batch(config)
    with torch.no_grad():
        reference = model(ids).logits
    plain = {}
    for bits in (8, 4):
        handles = [
            linear.register_forward_pre_hook(lambda m, a, bits=bits: (fake_quantize_per_token(a[0], bits),))
            for linear in model.model.transformer.blocks.modules() if isinstance(linear, torch.nn.Linear)
        ]
        with torch.no_grad():
            plain[bits] = relative_error(model(ids).logits, reference)
        for handle in handles:
            handle.remove()
    calibrate_sgat(model, ids, activation_bits=8)
    errors = {}
    for bits in (8, 4):
        for block in model.model.transformer.blocks:
            for linear in block.modules():
                if isinstance(linear, torch.nn.Linear):
                    linear.starquant_activation_bits = bits
        with torch.no_grad():
            errors[bits] = relative_error(model(ids).logits, reference)
    assert errors[8] < 0.9 * plain[8] and errors[4] < 0.9 * plain[4]
    assert errors[8] < errors[4]
