"""Trajectory drift of a quantized model against its full-precision original."""

import torch

from ..diffusion import DiffusionSamplingConfig, TrajectoryStep, diffusion_generate, hf_logits_fn, masked_nll

__all__ = ["late_step_mean", "masked_position_kl", "trajectory_drift", "mean_masked_nll"]


def masked_position_kl(reference_logits: torch.Tensor, quantized_logits: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """KL(p_fp || p_q) per position where `masked` [batch, seq] is true (in float64), as a flat tensor."""
    fp_logp = torch.log_softmax(reference_logits.double(), -1)
    q_logp = torch.log_softmax(quantized_logits.double(), -1)
    return (fp_logp.exp() * (fp_logp - q_logp)).sum(-1)[masked]


def late_step_mean(per_step: list[float]) -> float:
    """Mean over the second half of the denoising steps (the late-step drift of the reports)."""
    late = per_step[len(per_step) // 2:]
    return sum(late) / len(late)


@torch.no_grad()
def trajectory_drift(
    quantized, reference, tokenizer, prompts: list[str], sampling: DiffusionSamplingConfig, mask_token_id: int
) -> dict[str, list[float]]:
    """Per denoising step, averaged over prompts:

    - `kl`: KL(p_fp || p_q) at the positions still masked in the quantized model's canvas;
    - `flipped`: fraction of the quantized run's committed generation tokens that differ
      from the full-precision run's final output at the same position.
    """
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    prompt_length = ids.shape[1]
    reference_fn, quantized_fn = hf_logits_fn(reference), hf_logits_fn(quantized)
    fp_final = diffusion_generate(reference_fn, ids, mask_token_id, sampling, attention).sequences
    kl, flipped = [], []

    def record(step: TrajectoryStep) -> None:
        canvas_mask = torch.cat([attention, torch.ones_like(step.input_ids[:, prompt_length:])], 1)
        masked = step.input_ids == mask_token_id
        divergence = masked_position_kl(
            reference_fn(step.input_ids, canvas_mask),
            quantized_fn(step.input_ids, canvas_mask),
            masked,
        )
        kl.append(float(divergence.mean()) if masked.any() else 0.0)
        committed = step.canvas[:, prompt_length:] != mask_token_id
        differs = (step.canvas[:, prompt_length:] != fp_final[:, prompt_length:]) & committed
        flipped.append(float(differs.sum() / committed.sum().clamp(min=1)))

    diffusion_generate(quantized_fn, ids, mask_token_id, sampling, attention, trajectory_hook=record)
    return {"kl": kl, "flipped": flipped}


def mean_masked_nll(model, tokenizer, examples, mask_token_id: int, mc_samples: int = 32, seed: int = 0) -> float:
    """Average Monte-Carlo masked NLL (nats per answer) of the answers given the prompts."""
    total = 0.0
    for example in examples:
        prompt = torch.tensor(tokenizer(example.prompt)["input_ids"])
        answer = torch.tensor(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
        total += masked_nll(hf_logits_fn(model), prompt, answer, mask_token_id, mc_samples, min(16, mc_samples), seed)
    return total / len(examples)
