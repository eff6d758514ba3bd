"""LLaDA and Dream masked-diffusion decoding (the reference semantics every backend follows).

Canvas = left-padded prompt followed by `gen_length` mask tokens. The generation is split
into `gen_length / block_length` blocks decoded left to right and `steps` are split evenly
across blocks. At each step the model scores the whole canvas (bidirectional), a token is
proposed for every masked position (argmax, or float64 Gumbel-max when temperature > 0;
never the mask token itself, which would fill nothing), and the most confident proposals
inside the current block are committed: a fixed schedule (the first `n % steps` steps of
a block take one token more) or, with `threshold`, every proposal whose confidence reaches
it and at least one (Fast-dLLM parallel decoding).
Committed tokens are never re-masked, and no mask token is left in the generation. Prompts
must not contain the mask token (refused with `InputError`).

The model enters only as `logits_fn(input_ids, attention_mask) -> logits`, so the core
(transformers) and the vLLM engine run the same decoding code. A backend that can score
part of the canvas (`logits_fn(..., window=(lo, hi))`, logits of positions lo..hi-1) may
ask for `logits_window`: greedy decoding by confidence then computes the LM head only
from the first masked position to the end of the current block, the only positions a step
can commit (elsewhere the sampler draws noise over the whole canvas, so it scores it all).
"""

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from numbers import Integral
from typing import Literal

import torch

from ..errors import InputError

__all__ = [
    "MAX_LOGPROBS",
    "REMASKING",
    "TokenLogprobs",
    "Remasking",
    "DiffusionSamplingConfig",
    "DiffusionOutput",
    "TrajectoryStep",
    "LogitsFn",
    "diffusion_generate",
    "num_transfer_tokens",
    "add_gumbel_noise",
    "diffusion_steps",
    "filter_logits",
    "propose_tokens",
    "select_transfer",
    "hf_logits_fn",
]

LogitsFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

# Confidence rules for choosing which proposals to commit (LLaDA's and Dream's `alg` names):
# low_confidence / maskgit_plus: the proposal's probability; topk_margin: top-1 minus top-2
# probability; entropy: minus the entropy of the position's distribution; random: uniform.
REMASKING = ("low_confidence", "maskgit_plus", "topk_margin", "entropy", "random")
Remasking = Literal["low_confidence", "maskgit_plus", "topk_margin", "entropy", "random"]

# What `torch.Generator.manual_seed` takes.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_LOGPROBS = 20  # most likely alternatives recorded per token (OpenAI's `top_logprobs` bound)


def _is_integer(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)  # True is an int to Python, not a count


@dataclass
class DiffusionSamplingConfig:
    """Decoding settings, with LLaDA's names.

    Args:
        gen_length: tokens to generate (> 0).
        steps: denoising steps in total, a multiple of the number of blocks.
        block_length: tokens per semi-autoregressive block; must divide `gen_length`.
            `None` means one block (`gen_length`).
        temperature: 0 for argmax; > 0 samples with float64 Gumbel-max.
        remasking: which proposals a step commits: the most confident by `low_confidence` (LLaDA;
            `maskgit_plus` is Dream's name for it: the proposal's probability), `topk_margin` (top-1
            minus top-2 probability) or `entropy` (least entropy), or `random` ones.
        cfg_scale: classifier-free guidance scale (0 = off); the unconditional pass masks the prompt.
        threshold: confidence in (0, 1] for parallel decoding; the step count then adapts
            (at most `block_length` per block) and `steps` only bounds nothing.
        seed: seed of the generator for sampling and random remasking (any integer
            `torch.Generator.manual_seed` takes: -2**63 .. 2**64 - 1).
        top_k: propose only among the `top_k` most likely tokens of a position (None: all).
        top_p: propose only among the smallest set of most likely tokens whose probability
            reaches `top_p` (nucleus; None or 1: all). Like Dream's, both filter the logits before
            sampling and before the confidence is computed.
        logprobs: record each generated token's log-probability and the `logprobs` most likely
            tokens of its position (0 .. MAX_LOGPROBS; None: record nothing). A token's
            log-probability is the model's at the step that committed it: log-softmax of that
            step's logits (after classifier-free guidance, before temperature, top-k and top-p;
            the mask token excluded, as it is never generated), the "raw" log-probabilities vLLM
            and OpenAI report.
    """

    gen_length: int
    steps: int | None = None
    block_length: int | None = None
    temperature: float = 0.0
    remasking: Remasking = "low_confidence"
    cfg_scale: float = 0.0
    threshold: float | None = None
    seed: int = 0
    top_k: int | None = None
    top_p: float | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_integer(self.gen_length) or self.gen_length <= 0:
            raise ValueError(f"gen_length must be a positive integer, got {self.gen_length!r}")
        if self.block_length is None:
            self.block_length = self.gen_length
        if self.steps is None:
            self.steps = self.gen_length
        if not _is_integer(self.block_length) or self.block_length <= 0:
            raise ValueError(f"block_length must be a positive integer, got {self.block_length!r}")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"block_length={self.block_length} does not divide gen_length={self.gen_length}"
            )
        if not _is_integer(self.steps) or self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps={self.steps} is not divisible by the number of blocks "
                f"{self.num_blocks} (gen_length {self.gen_length} / block_length {self.block_length})"
            )
        # `not x >= 0` and `isfinite` also refuse NaN, which every comparison lets through.
        if not math.isfinite(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {', '.join(REMASKING)}, got {self.remasking!r}")
        if not math.isfinite(self.cfg_scale) or not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.threshold is not None and self.remasking in ("entropy", "random"):
            raise ValueError(f"threshold is a probability: it applies to remasking low_confidence, maskgit_plus or "
                             f"topk_margin, not {self.remasking!r}")
        if self.top_k is not None and (not _is_integer(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.logprobs is not None and (not _is_integer(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not _is_integer(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed!r}")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


@dataclass
class TrajectoryStep:
    """One denoising step, as given to a trajectory hook.

    `canvas` is the full [batch, seq] canvas *after* the step's commits; `committed` marks
    the positions filled in this step; `mask_ratio` [batch] is the fraction of generation
    positions still masked *before* the step (the time the model saw); `logprobs` those of the
    generation's committed tokens so far (`DiffusionSamplingConfig.logprobs`; updated in place by
    later steps).
    """

    step: int
    block: int
    input_ids: torch.Tensor | None
    canvas: torch.Tensor
    committed: torch.Tensor
    mask_ratio: torch.Tensor
    logprobs: "TokenLogprobs | None" = None


@dataclass
class TokenLogprobs:
    """Log-probabilities of the generated tokens (see `DiffusionSamplingConfig.logprobs`):
    `token` [batch, gen_length] float32 (NaN where not yet committed); `top_ids` / `top` [batch,
    gen_length, k] the k most likely tokens of each position and their log-probabilities."""

    token: torch.Tensor
    top_ids: torch.Tensor
    top: torch.Tensor

    @classmethod
    def empty(cls, batch: int, gen_length: int, k: int, device) -> "TokenLogprobs":
        return cls(torch.full((batch, gen_length), float("nan"), device=device),
                   torch.zeros((batch, gen_length, k), dtype=torch.long, device=device),
                   torch.full((batch, gen_length, k), float("nan"), device=device))

    def record(self, logits: torch.Tensor, offset: int, transfer: torch.Tensor, canvas: torch.Tensor,
               prompt_len: int, mask_token_id: int) -> None:
        """Record the tokens `transfer` [batch, seq] commits into `canvas` from a step's `logits`
        [batch, positions, vocab] of canvas positions offset.. (only those rows are normalized)."""
        rows, positions = transfer.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        scores = logits[rows, positions - offset].float()
        scores[:, mask_token_id] = float("-inf")
        logprobs = torch.log_softmax(scores, dim=-1)
        slots = positions - prompt_len
        self.token[rows, slots] = logprobs.gather(-1, canvas[rows, positions][:, None]).squeeze(-1)
        if self.top.shape[-1]:
            top, top_ids = logprobs.topk(self.top.shape[-1], dim=-1)
            self.top[rows, slots], self.top_ids[rows, slots] = top, top_ids


@dataclass
class DiffusionOutput:
    """`sequences` [batch, prompt_len + gen_length] (prompts left-padded), `generated` [batch, gen_length],
    `steps` the number of denoising steps (model calls without CFG) that were run."""

    sequences: torch.Tensor
    generated: torch.Tensor
    steps: int
    steps_per_block: list[int] = field(default_factory=list)
    logprobs: TokenLogprobs | None = None  # with `DiffusionSamplingConfig.logprobs`


def num_transfer_tokens(masked_in_block: torch.Tensor, steps: int) -> torch.Tensor:
    """Commit schedule of one block: [batch, steps] counts summing to each row's masked count,
    spread evenly with the first `n % steps` steps taking one more."""
    count = masked_in_block.sum(dim=1, keepdim=True)
    base, remainder = count // steps, count % steps
    schedule = base.expand(-1, steps).clone()
    schedule += (torch.arange(steps, device=count.device)[None] < remainder).long()
    return schedule


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None,
                  mask_token_id: int | None = None) -> torch.Tensor:
    """`logits` with every token outside each position's top-k and nucleus (top-p) set to -inf;
    the most likely token is always kept. The mask token (never a proposal: see `propose_tokens`)
    is not ranked and not dropped, so k and p count real tokens. Unchanged (the same tensor) when
    neither applies."""
    if (top_k is None or top_k >= logits.shape[-1]) and (top_p is None or top_p >= 1):
        return logits
    ranked = logits
    if mask_token_id is not None:
        ranked = logits.clone()
        ranked[..., mask_token_id] = float("-inf")
    drop = torch.zeros_like(logits, dtype=torch.bool)
    if top_k is not None and top_k < logits.shape[-1]:
        drop |= ranked < ranked.topk(top_k, dim=-1).values[..., -1:]
    if top_p is not None and top_p < 1:
        ordered, order = ranked.sort(dim=-1, descending=True)
        probs = torch.softmax(ordered.to(torch.float64), dim=-1)
        above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop |= torch.zeros_like(drop).scatter(-1, order, above >= top_p)
    if mask_token_id is not None:
        drop[..., mask_token_id] = False
    return logits.masked_fill(drop, float("-inf"))


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Scores whose argmax is a sample at `temperature` (float64 Gumbel-max, as in LLaDA)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return logits.exp() / (-torch.log(noise)) ** temperature


def propose_tokens(
    logits: torch.Tensor,
    config: DiffusionSamplingConfig,
    generator: torch.Generator | None,
    mask_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposed token and its confidence for every position: ([batch, seq] ids, [batch, seq] float64).

    With `mask_token_id`, a position whose best score is the mask token proposes its best other
    token instead (with that token's probability as confidence): committing the mask would fill
    nothing, and the position would end the block still masked. Elsewhere nothing changes.
    """
    logits = filter_logits(logits, config.top_k, config.top_p, mask_token_id)
    scores = add_gumbel_noise(logits, config.temperature, generator)
    proposal = scores.argmax(dim=-1)
    if mask_token_id is not None:
        proposes_mask = proposal == mask_token_id
        if bool(proposes_mask.any()):
            others = scores[proposes_mask]  # a copy of those positions only: the caller's logits stay as they are
            others[:, mask_token_id] = float("-inf")
            proposal[proposes_mask] = others.argmax(dim=-1)
    if config.remasking == "random":
        confidence = torch.rand(proposal.shape, generator=generator, dtype=torch.float64, device=logits.device)
        return proposal, confidence
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    if config.remasking == "topk_margin":
        top = probs.topk(2, dim=-1).values
        confidence = top[..., 0] - top[..., 1]
    elif config.remasking == "entropy":
        confidence = (probs * torch.log(probs.clamp(min=1e-300))).sum(-1)  # minus the entropy
    else:  # low_confidence, maskgit_plus
        confidence = torch.gather(probs, -1, proposal[..., None]).squeeze(-1)
    return proposal, confidence


def select_transfer(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool [batch, seq]: the `counts[b]` most confident positions of each row (ties: lower index first).

    Positions with confidence -inf are never chosen.
    """
    order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < counts[:, None]) & (confidence > float("-inf"))


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Adapt a transformers model of a registered family to `logits_fn(input_ids, attention_mask[,
    window])`: predictions, row i for the token at position i, with the family's logits shift
    applied (`ModelFamily.predictions`); a window runs the LM head on the positions it needs only
    (`logits_to_keep`)."""
    from ..models.family import family_of  # models/ imports this package

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, window) -> torch.Tensor:
        keep = 0 if window is None else slice(*window)
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits

    return family_of(model.config).logits_fn(forward)


def _guided_logits(
    logits_fn: LogitsFn,
    canvas: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_positions: torch.Tensor,
    mask_token_id: int,
    cfg_scale: float,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    score = logits_fn if window is None else (lambda ids, mask: logits_fn(ids, mask, window=window))
    if cfg_scale == 0:
        return score(canvas, attention_mask)
    unconditional = canvas.masked_fill(prompt_positions, mask_token_id)
    both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    logits, uncond_logits = score(torch.cat([canvas, unconditional]), both_mask).chunk(2)
    return uncond_logits + (cfg_scale + 1) * (logits - uncond_logits)


def diffusion_generate(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    mask_token_id: int,
    config: DiffusionSamplingConfig,
    attention_mask: torch.Tensor | None = None,
    trajectory_hook: Callable[[TrajectoryStep], None] | None = None,
    logits_window: bool = False,
) -> DiffusionOutput:
    """Decode `gen_length` tokens after each (left-padded) prompt.

    Every position of the returned generation holds a token other than the mask: the mask
    token is never proposed, each block's schedule commits all of its positions, and a prompt
    (or padding) containing the mask id is refused (`InputError`) rather than filled in.

    Args:
        logits_fn: `(input_ids [b, s], attention_mask [b, s] | None) -> logits [b, s, vocab]`.
        input_ids: [batch, prompt_len] prompts, left-padded; none may hold `mask_token_id`.
        attention_mask: [batch, prompt_len], 1 for prompt tokens, 0 for padding; None = no padding.
        trajectory_hook: called after every step with a `TrajectoryStep`.
        logits_window: `logits_fn` also takes `window=(lo, hi)` and then returns logits
            [b, hi - lo, vocab]; used where it cannot change the result (see the module docstring).
    """
    steps = diffusion_steps(logits_fn, input_ids, mask_token_id, config, attention_mask, logits_window,
                            record_inputs=trajectory_hook is not None)
    while True:
        try:
            step = next(steps)
        except StopIteration as finished:
            return finished.value
        if trajectory_hook is not None:
            trajectory_hook(TrajectoryStep(step.step, step.block, step.input_ids, step.canvas.clone(), step.committed,
                                           step.mask_ratio, step.logprobs))


@torch.no_grad()
def diffusion_steps(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    mask_token_id: int,
    config: DiffusionSamplingConfig,
    attention_mask: torch.Tensor | None = None,
    logits_window: bool = False,
    record_inputs: bool = False,
) -> Generator[TrajectoryStep, None, DiffusionOutput]:
    """`diffusion_generate` one step at a time: yields a `TrajectoryStep` after every step (its
    `input_ids` None unless `record_inputs`; `canvas` is not modified afterwards) and returns the
    `DiffusionOutput` (`StopIteration.value`). Each resumption runs under `torch.no_grad`, so a
    caller may interleave other work between steps (streaming)."""
    _refuse_mask_in_prompts(input_ids, attention_mask, mask_token_id)
    windowed = logits_window and config.temperature == 0 and config.remasking != "random"
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    canvas = torch.full((batch, prompt_len + config.gen_length), mask_token_id, dtype=torch.long, device=device)
    canvas[:, :prompt_len] = input_ids
    canvas_mask = None
    prompt_positions = torch.zeros_like(canvas, dtype=torch.bool)
    if attention_mask is not None and not bool(attention_mask.all()):
        canvas_mask = torch.cat([attention_mask.long(), torch.ones_like(canvas[:, prompt_len:])], dim=1)
        prompt_positions[:, :prompt_len] = attention_mask.bool()
    else:
        prompt_positions[:, :prompt_len] = True

    record = None if config.logprobs is None else TokenLogprobs.empty(batch, config.gen_length, config.logprobs, device)
    total_steps, steps_per_block = 0, []
    for block in range(config.num_blocks):
        start = prompt_len + block * config.block_length
        end = start + config.block_length
        # Steps beyond one token per step would commit nothing (the loop ends when the block is
        # filled); capping them keeps the schedule's size bounded by the block, not by `steps`.
        schedule = num_transfer_tokens(
            canvas[:, start:end] == mask_token_id, min(config.steps_per_block, config.block_length)
        )
        block_steps = 0
        while bool((canvas[:, start:end] == mask_token_id).any()):
            if config.threshold is None and block_steps >= schedule.shape[1]:
                break  # schedule exhausted (only reachable if the caller altered the canvas)
            masked = canvas == mask_token_id
            mask_ratio = masked[:, prompt_len:].double().mean(dim=1)
            # Only masked positions before the block's end can be committed.
            lo = int(masked[:, :end].any(dim=0).nonzero()[0]) if windowed else 0
            logits = _guided_logits(
                logits_fn, canvas, canvas_mask, prompt_positions, mask_token_id, config.cfg_scale,
                window=(lo, end) if windowed else None,
            )
            if config.threshold is not None:
                # A proposed mask token would commit nothing, and the block might never finish.
                logits[..., mask_token_id] = float("-inf")
            proposal, confidence = propose_tokens(logits, config, generator, mask_token_id)
            if windowed:
                proposal = torch.cat([canvas[:, :lo], proposal, canvas[:, end:]], dim=1)
                outside = torch.full_like(canvas, float("-inf"), dtype=confidence.dtype)
                confidence = torch.cat([outside[:, :lo], confidence, outside[:, end:]], dim=1)
            confidence[:, end:] = float("-inf")
            proposal = torch.where(masked, proposal, canvas)
            confidence = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
            if bool(confidence.isnan().any()):
                # NaN is never selected: those positions would stay masked (or, with a threshold, loop forever).
                raise RuntimeError(
                    f"decoding step {total_steps}: the model's logits are not finite at "
                    f"{int(confidence.isnan().sum())} masked position(s), so no token can be chosen there"
                )
            if config.threshold is None:
                transfer = select_transfer(confidence, schedule[:, block_steps])
            else:
                # Fast-dLLM: the best proposal always, plus every other one above the threshold.
                transfer = select_transfer(confidence, torch.ones(batch, dtype=torch.long, device=device))
                transfer |= confidence >= config.threshold
            step_input = canvas if record_inputs else None  # never modified in place: a new tensor each step
            canvas = torch.where(transfer, proposal, canvas)
            if record is not None:
                record.record(logits, lo if windowed else 0, transfer, canvas, prompt_len, mask_token_id)
            yield TrajectoryStep(total_steps, block, step_input, canvas, transfer, mask_ratio, record)
            block_steps += 1
            total_steps += 1
        steps_per_block.append(block_steps)
    left = canvas[:, prompt_len:] == mask_token_id
    if bool(left.any()):  # the guarantee of the docstring; reaching this is a bug of the sampler
        raise RuntimeError(f"decoding left {int(left.sum())} mask token(s) in the generation")
    return DiffusionOutput(canvas, canvas[:, prompt_len:], total_steps, steps_per_block, record)


def _refuse_mask_in_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask_token_id: int) -> None:
    """InputError naming the row and position of the first mask id among the prompts: the sampler
    would take it for a position to fill, and it would take one of the block's commits."""
    found = input_ids == mask_token_id
    if not bool(found.any()):
        return
    row, position = (int(index) for index in found.nonzero()[0])
    if attention_mask is not None and not bool(attention_mask[row, position]):
        raise InputError(
            f"prompt {row} is padded with the mask token id {mask_token_id} (position {position}); pad with another id"
        )
    raise InputError(
        f"prompt {row} contains the mask token id {mask_token_id} at position {position}: "
        "prompts cannot contain the mask token"
    )
