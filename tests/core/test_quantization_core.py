"""STaR-Quant core maths: rotations, quantizers, SGAT exactness and benefit, TAC recovery."""

import pytest
import torch

from starquant_plugin.quantization import (
    apply_tac,
    block_hadamard,
    build_sgat_site,
    fake_quantize_per_token,
    fake_quantize_weight,
    fit_tac,
    fit_tac_to_output,
    hadamard_matrix,
    sgat_linear,
    sgat_transform_weight,
)
from starquant_plugin.quantization.sgat import sgat_compensation
from starquant_plugin.quantization.tac import calibrated_bucket_edges, mask_ratio_bucket, shrink_tac, uniform_bucket_edges


def state_disparate_inputs(tokens=512, dim=64, seed=0, dtype=torch.float64):
    """Masked tokens share one offset pattern with outlier channels; unmasked tokens vary."""
    g = torch.Generator().manual_seed(seed)
    states = (torch.rand(tokens, generator=g) < 0.5).long()
    x = torch.randn(tokens, dim, generator=g, dtype=dtype)
    masked_offset = torch.randn(dim, generator=g, dtype=dtype) * 4
    masked_offset[:3] = 40.0  # outlier channels only in the masked state
    x[states == 1] = x[states == 1] * 0.3 + masked_offset
    x[:, 5] *= 10  # a channel outlier in both states
    weight = torch.randn(48, dim, generator=g, dtype=dtype) / dim**0.5
    return x, states, weight


def test_hadamard_is_orthonormal_and_block_rotation_involutive():
    h = hadamard_matrix(16, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(16, dtype=torch.float64))
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(block_hadamard(block_hadamard(x, 16), 16), x)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)
    with pytest.raises(ValueError, match="does not divide the dimension 64"):
        block_hadamard(x, 128)


def test_quantizers_hit_the_integer_grid():
    x = torch.randn(4, 32)
    q = fake_quantize_per_token(x, 8)
    scale = x.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(q / scale, (q / scale).round(), atol=1e-4, rtol=0)
    assert (q - x).abs().max() <= scale.max() / 2 + 1e-6
    w = torch.randn(8, 64)
    wq = fake_quantize_weight(w, 4, group_size=16)
    assert len(torch.unique((wq.reshape(8, 4, 16) / wq.reshape(8, 4, 16).abs().amax(-1, keepdim=True)).round(decimals=4))) <= 16


@pytest.mark.parametrize("rotation_block", [0, 16, 64])
@pytest.mark.parametrize("per_state_shift", [True, False])
def test_sgat_is_exact_without_quantization(rotation_block, per_state_shift):
    x, states, weight = state_disparate_inputs()
    bias = torch.randn(48, dtype=torch.float64)
    site = build_sgat_site(x, states, [weight], rotation_block, per_state_shift=per_state_shift)
    site.smoothing, site.shift = site.smoothing.double(), site.shift.double()
    output = sgat_linear(
        x * site.smoothing, states, site, sgat_transform_weight(weight, site), sgat_compensation(weight, site), None, bias
    )
    torch.testing.assert_close(output, x @ weight.T + bias, atol=1e-9, rtol=1e-9)


def test_sgat_beats_plain_per_token_quantization_on_state_disparity():
    x, states, weight = state_disparate_inputs(dtype=torch.float32)
    reference = x @ weight.T
    plain = fake_quantize_per_token(x, 4) @ fake_quantize_weight(weight, 8).T
    site = build_sgat_site(
        x, states, [weight], rotation_block=64, activation_bits=4, quantize_weight=lambda w: fake_quantize_weight(w, 8)
    )
    transformed = sgat_transform_weight(weight, site)
    sgat = sgat_linear(x * site.smoothing, states, site, fake_quantize_weight(transformed, 8), sgat_compensation(weight, site), 4)
    plain_error = (plain - reference).pow(2).mean()
    sgat_error = (sgat - reference).pow(2).mean()
    assert sgat_error < 0.25 * plain_error
    # Each ingredient matters: dropping the per-state shift is worse.
    shared = build_sgat_site(
        x, states, [weight], 64, per_state_shift=False, activation_bits=4, quantize_weight=lambda w: fake_quantize_weight(w, 8)
    )
    shared_out = sgat_linear(
        x * shared.smoothing, states, shared, fake_quantize_weight(sgat_transform_weight(weight, shared), 8),
        sgat_compensation(weight, shared), 4,
    )
    assert sgat_error < (shared_out - reference).pow(2).mean()


def test_per_state_clip_search_lowers_error():
    x, states, weight = state_disparate_inputs(dtype=torch.float32)
    # Gaussian rows at 4 bits: MSE-optimal clipping sits well below the row maximum.
    x[states == 0] = torch.randn(int((states == 0).sum()), 64, generator=torch.Generator().manual_seed(3))
    kwargs = dict(rotation_block=0, smoothing_strength=0.0, activation_bits=4)
    searched = build_sgat_site(x, states, [weight], **kwargs)
    unclipped = build_sgat_site(x, states, [weight], **kwargs, clip_grid=(1.0,))
    assert searched.clip[0] < 1.0

    def error(site):
        out = sgat_linear(x * site.smoothing, states, site, sgat_transform_weight(weight, site), sgat_compensation(weight, site), 4)
        return (out - x @ weight.T)[states == 0].pow(2).mean()

    assert error(searched) < error(unclipped)


def test_tac_recovers_a_known_blockwise_affine_distortion():
    g = torch.Generator().manual_seed(0)
    tokens, heads, b = 4000, 4, 8
    o_q = torch.randn(tokens, heads * b, generator=g, dtype=torch.float64)
    true_a = torch.eye(b, dtype=torch.float64) + 0.2 * torch.randn(heads, b, b, generator=g, dtype=torch.float64)
    true_c = torch.randn(heads * b, generator=g, dtype=torch.float64)
    o_fp = (true_a @ o_q.reshape(tokens, heads, b, 1)).reshape(tokens, -1) + true_c
    fitted = fit_tac(o_q, o_fp, block_size=b, ridge=1e-8)
    torch.testing.assert_close(fitted.matrices[0], true_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(fitted.offsets[0], true_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_tac(o_q, fitted), o_fp, atol=1e-5, rtol=0)
    # A strong ridge pulls the map back toward the identity.
    shrunk = fit_tac(o_q, o_fp, block_size=b, ridge=1e3)
    assert (shrunk.matrices[0] - torch.eye(b)).abs().mean() < (fitted.matrices[0] - torch.eye(b)).abs().mean()


def _coupled_projection(seed=3, tokens=3000, heads=4, b=8):
    """Attention outputs with a known block-wise affine distortion, seen through a dense projection
    that mixes the heads (so the blocks must be fitted jointly)."""
    g = torch.Generator().manual_seed(seed)
    o_q = torch.randn(tokens, heads * b, generator=g, dtype=torch.float64)
    true_a = torch.eye(b, dtype=torch.float64) + 0.2 * torch.randn(heads, b, b, generator=g, dtype=torch.float64)
    true_c = 0.5 * torch.randn(heads * b, generator=g, dtype=torch.float64)
    o_fp = (true_a @ o_q.reshape(tokens, heads, b, 1)).reshape(tokens, -1) + true_c
    weight = torch.randn(heads * b, heads * b + 8, generator=g, dtype=torch.float64) / (heads * b) ** 0.5
    return o_q, o_fp, weight, true_a, true_c, g


def test_tac_output_fit_recovers_a_known_distortion_through_a_head_mixing_projection():
    o_q, o_fp, weight, true_a, true_c, _ = _coupled_projection()
    fitted = fit_tac_to_output(o_q, o_fp @ weight - o_q @ weight, weight, block_size=8, ridge=1e-10, iterations=60)
    torch.testing.assert_close(fitted.matrices[0], true_a, atol=1e-4, rtol=0)
    torch.testing.assert_close(fitted.offsets[0], true_c, atol=1e-4, rtol=0)


def test_tac_output_fit_undoes_the_projections_own_systematic_error():
    # The quantized projection has its own (predictable) weight error: matching the attention
    # output cannot see it, matching the projection's output can.
    o_q, o_fp, weight, _, _, g = _coupled_projection(seed=4)
    scale = 1 + 0.1 * torch.randn(weight.shape[0], 1, generator=g, dtype=torch.float64)
    weight_q = weight * scale  # e.g. a per-input-channel scale error: a block-diagonal map can undo it
    wanted, got = o_fp @ weight, o_q @ weight_q

    def output_error(tac):
        return float((apply_tac(o_q, tac) @ weight_q - wanted).pow(2).mean())

    identity = fit_tac(o_q, o_q, block_size=8, ridge=1e-8)
    attention_fit = fit_tac(o_q, o_fp, block_size=8, ridge=1e-8)
    # The fit sees the projection through its full-precision weight (as the modifier does).
    fits = [fit_tac_to_output(o_q, wanted - got, weight, 8, ridge=1e-8, iterations=n) for n in (1, 4, 32)]
    objective = [float(((apply_tac(o_q, tac) - o_q) @ weight - (wanted - got)).pow(2).sum()) for tac in fits]
    assert objective[0] >= objective[1] >= objective[2]  # conjugate gradients never go up
    assert output_error(fits[2]) < 0.5 * output_error(attention_fit) < 0.5 * output_error(identity)
    with pytest.raises(ValueError, match="weight"):
        fit_tac_to_output(o_q, wanted - got, weight[:-1], 8)


def test_shrink_tac_interpolates_between_the_fitted_map_and_the_identity():
    g = torch.Generator().manual_seed(2)
    o_q = torch.randn(500, 16, generator=g, dtype=torch.float64)
    o_fp = o_q @ (torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=g, dtype=torch.float64)) + 1.0
    fitted = fit_tac(o_q, o_fp, block_size=8, ridge=1e-8)
    full, half, none = (apply_tac(o_q, shrink_tac(fitted, s)) for s in (1.0, 0.5, 0.0))
    torch.testing.assert_close(full, apply_tac(o_q, fitted))
    torch.testing.assert_close(none, o_q)  # strength 0 is the identity map with no offset
    torch.testing.assert_close(half, (full + o_q) / 2)


def test_tac_buckets_fit_separate_maps_by_mask_ratio():
    g = torch.Generator().manual_seed(1)
    o_q = torch.randn(3000, 16, generator=g, dtype=torch.float64)
    ratio = torch.rand(3000, generator=g, dtype=torch.float64)
    buckets = mask_ratio_bucket(ratio, uniform_bucket_edges(2))
    scale = torch.where(buckets == 0, 0.5, 2.0)[:, None]
    o_fp = o_q * scale
    fitted = fit_tac(o_q, o_fp, block_size=16, ridge=1e-8, buckets=buckets, num_buckets=2)
    torch.testing.assert_close(fitted.matrices[0, 0], 0.5 * torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(fitted.matrices[1, 0], 2.0 * torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_tac(o_q, fitted, buckets), o_fp, atol=1e-6, rtol=0)
    assert mask_ratio_bucket(torch.tensor([0.0, 0.5, 0.51, 1.0]), uniform_bucket_edges(2)).tolist() == [0, 0, 1, 1]


def test_calibrated_bucket_edges_split_the_observed_ratios_evenly():
    # Canvases of a 10-token prompt + 5-token answer: ratios 0..1/3, all in one equal-width bucket.
    ratios = torch.tensor([m / 15 for m in range(6)] * 10)
    assert mask_ratio_bucket(ratios, uniform_bucket_edges(2)).unique().tolist() == [0]
    for k in (2, 3):
        edges = calibrated_bucket_edges(ratios, k)
        assert len(edges) == k - 1 and edges == sorted(edges) and 0 < edges[0] and edges[-1] < 1 / 3
        counts = torch.bincount(mask_ratio_bucket(ratios, edges), minlength=k)
        assert counts.min() >= len(ratios) // k - 10, counts  # as even as the ties allow
    assert calibrated_bucket_edges(ratios, 1) == []
