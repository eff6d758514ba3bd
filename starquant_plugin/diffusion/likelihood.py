"""Monte-Carlo masked-NLL (ELBO) estimator of an answer given a prompt, as in LLaDA's evaluation.

For a mask count `l` of the `L` answer tokens drawn uniformly (stratified over a batch),
`-log p(answer | prompt) <= E[ (L / l) * sum_{masked i} -log p_theta(answer_i | noisy) ]`.
"""

import torch
from torch.nn import functional as F

from .masking import mask_positions
from .sampler import DiffusionSamplingConfig, LogitsFn, diffusion_generate

__all__ = ["masked_nll", "score_answer"]


@torch.no_grad()
def masked_nll(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    mask_token_id: int,
    mc_samples: int = 128,
    batch_size: int = 16,
    seed: int = 0,
) -> float:
    """Upper bound on -log p(answer | prompt) in nats, estimated with `mc_samples` maskings.

    Args:
        prompt_ids: [prompt_len] token ids; answer_ids: [answer_len] token ids.
        mc_samples: Monte-Carlo samples, a multiple of `batch_size`.
    """
    if answer_ids.numel() == 0:
        raise ValueError("answer_ids is empty")
    if mc_samples <= 0 or mc_samples % batch_size:
        raise ValueError(f"mc_samples={mc_samples} must be a positive multiple of batch_size={batch_size}")
    generator = torch.Generator().manual_seed(seed)
    answer_len = answer_ids.numel()
    sequence = torch.cat([prompt_ids, answer_ids]).cpu()[None].repeat(batch_size, 1)
    maskable = torch.zeros_like(sequence, dtype=torch.bool)
    maskable[:, prompt_ids.numel():] = True
    device = prompt_ids.device
    total = 0.0
    for _ in range(mc_samples // batch_size):
        # LLaDA's stratified counts: batch_size evenly spaced mask counts in 1..answer_len.
        first = torch.randint(1, answer_len + 1, (), generator=generator)
        counts = torch.round(torch.linspace(float(first), first + (batch_size - 1) * answer_len / batch_size, batch_size))
        counts = (counts.long() - 1) % answer_len + 1
        ratios = counts.double() / answer_len
        noisy, is_masked = mask_positions(sequence, maskable, ratios, mask_token_id, generator, exact=True)
        logits = logits_fn(noisy.to(device), None).float().cpu()
        token_nll = F.cross_entropy(logits[is_masked], sequence[is_masked], reduction="none")
        weights = (1.0 / ratios)[:, None].expand_as(is_masked)[is_masked]
        total += float((token_nll.double() * weights).sum()) / batch_size
    return total / (mc_samples // batch_size)


@torch.no_grad()
def score_answer(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    mask_token_id: int,
    mc_samples: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    greedy: bool = True,
    logits_window: bool = False,
) -> tuple[float, bool | None]:
    """(`masked_nll` of the answer, whether greedy decoding of `len(answer)` tokens in one block,
    one token per step, reproduces it exactly; None when `greedy` is False): what a
    log-likelihood evaluation (lm-evaluation-harness's `loglikelihood`) asks of a model.
    `logits_window` as in `diffusion_generate`."""
    nll = masked_nll(logits_fn, prompt_ids, answer_ids, mask_token_id, mc_samples, batch_size, seed)
    if not greedy:
        return nll, None
    length = answer_ids.numel()
    decoded = diffusion_generate(logits_fn, prompt_ids[None], mask_token_id,
                                 DiffusionSamplingConfig(gen_length=length, steps=length), logits_window=logits_window)
    return nll, bool(torch.equal(decoded.generated[0].cpu(), answer_ids.cpu()))
