"""Masked-NLL (ELBO) estimator and masking utilities."""

import math

import pytest
import torch

from starquant_plugin.diffusion import (
    MASKED,
    UNMASKED,
    mask_positions,
    masked_nll,
    masked_state,
    spread_mask_ratios,
    token_states,
)

VOCAB, MASK = 12, 11


def test_masked_nll_of_uniform_model_is_length_times_log_vocab():
    def uniform(input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, VOCAB)

    nll = masked_nll(uniform, torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8]), MASK, mc_samples=32, batch_size=8)
    assert nll == pytest.approx(5 * math.log(VOCAB), rel=1e-6)


def test_masked_nll_of_oracle_model_is_length_times_minus_log_p():
    answer = torch.tensor([4, 5, 6, 7])
    sequence = torch.cat([torch.tensor([1, 2]), answer])
    p_true = 0.8

    def oracle(input_ids, attention_mask=None):
        # Puts probability p_true on the clean token at every position, whatever is masked.
        probs = torch.full((*input_ids.shape, VOCAB), (1 - p_true) / (VOCAB - 1))
        probs[:, torch.arange(sequence.numel()), sequence] = p_true
        return probs.log()

    nll = masked_nll(oracle, sequence[:2], answer, MASK, mc_samples=16, batch_size=4)
    assert nll == pytest.approx(4 * -math.log(p_true), rel=1e-6)


def test_masked_nll_only_masks_answer_and_validates():
    seen = []

    def spy(input_ids, attention_mask=None):
        seen.append(input_ids.clone())
        return torch.zeros(*input_ids.shape, VOCAB)

    masked_nll(spy, torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7]), MASK, mc_samples=8, batch_size=4)
    stacked = torch.cat(seen)
    assert not (stacked[:, :3] == MASK).any()
    assert ((stacked[:, 3:] == MASK).sum(1) >= 1).all()
    with pytest.raises(ValueError, match="multiple of batch_size"):
        masked_nll(spy, torch.tensor([1]), torch.tensor([2]), MASK, mc_samples=10, batch_size=4)
    with pytest.raises(ValueError, match="answer_ids is empty"):
        masked_nll(spy, torch.tensor([1]), torch.tensor([], dtype=torch.long), MASK)


def test_states_come_from_input_ids():
    ids = torch.tensor([[1, MASK, 3, MASK]])
    assert masked_state(ids, MASK).tolist() == [[False, True, False, True]]
    assert token_states(ids, MASK).tolist() == [[UNMASKED, MASKED, UNMASKED, MASKED]]


def test_mask_positions_exact_counts_only_maskable():
    ids = torch.arange(1, 11).repeat(4, 1)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 2:] = True
    ratios = torch.tensor([0.01, 0.25, 0.5, 1.0])
    noisy, is_masked = mask_positions(ids, maskable, ratios, MASK, torch.Generator().manual_seed(0))
    assert is_masked.sum(1).tolist() == [1, 2, 4, 8]
    assert not is_masked[:, :2].any()
    assert torch.equal(noisy == MASK, is_masked)
    assert torch.equal(noisy[~is_masked], ids[~is_masked])


def test_mask_positions_bernoulli_rate():
    ids = torch.ones(200, 100, dtype=torch.long)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    _, is_masked = mask_positions(ids, maskable, torch.full((200,), 0.3), MASK, torch.Generator().manual_seed(0), exact=False)
    assert abs(is_masked.float().mean().item() - 0.3) < 0.01


def test_spread_mask_ratios_cover_unit_interval():
    ratios = spread_mask_ratios(8, torch.Generator().manual_seed(0))
    assert ((ratios > 0) & (ratios <= 1)).all()
    assert torch.equal(torch.floor(ratios * 8).long(), torch.arange(8))  # one ratio per stratum
    with pytest.raises(ValueError, match="count must be positive"):
        spread_mask_ratios(0)


def test_masked_position_kl_is_the_kl_at_masked_positions_only():
    from starquant_plugin.evaluation.drift import masked_position_kl

    generator = torch.Generator().manual_seed(0)
    fp, quantized = torch.randn(2, 5, VOCAB, generator=generator), torch.randn(2, 5, VOCAB, generator=generator)
    masked = torch.tensor([[True, False, True, False, False], [False, False, False, False, True]])
    kl = masked_position_kl(fp, quantized, masked)
    assert kl.shape == (3,)
    p, q = fp.double().softmax(-1)[masked], quantized.double().softmax(-1)[masked]
    torch.testing.assert_close(kl, (p * (p.log() - q.log())).sum(-1))
    assert (kl > 0).all()
    assert masked_position_kl(fp, fp, masked).abs().max() < 1e-12
