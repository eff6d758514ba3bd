"""Diffusion sampler semantics: schedule, blocks, remasking, temperature, threshold, CFG, batching."""

import pytest
import torch

from starquant_plugin.diffusion import (
    DiffusionSamplingConfig,
    TrajectoryStep,
    diffusion_generate,
    hf_logits_fn,
    num_transfer_tokens,
)
from starquant_plugin.errors import InputError

VOCAB, MASK = 20, 19


def content_logits(input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """A deterministic stand-in model whose logits depend on the whole canvas (no ties)."""
    batch, seq = input_ids.shape
    context = (input_ids.double() * torch.arange(1, seq + 1, dtype=torch.double)).sum(1)
    pos = torch.arange(seq, dtype=torch.double)[None, :, None]
    vocab = torch.arange(VOCAB, dtype=torch.double)[None, None, :]
    logits = 3 * torch.sin(0.7 * pos * (vocab + 1) + 0.013 * context[:, None, None] + 0.31 * vocab)
    logits[..., MASK] = -1e9  # never propose the mask token
    return logits.float()


def llada_reference_generate(prompt: torch.Tensor, steps: int, gen_length: int, block_length: int) -> torch.Tensor:
    """LLaDA's published `generate` (temperature 0, low_confidence), re-written row by row."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), MASK, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt
    blocks = gen_length // block_length
    for b in range(blocks):
        start = prompt.shape[1] + b * block_length
        end = start + block_length
        count = int((x[0, start:end] == MASK).sum())
        per_step = [count // (steps // blocks) + (1 if i < count % (steps // blocks) else 0) for i in range(steps // blocks)]
        for i in range(steps // blocks):
            mask_index = x == MASK
            logits = content_logits(x)
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None]).squeeze(-1)
            p[:, end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, p, torch.tensor(-float("inf"), dtype=torch.double))
            for row in range(x.shape[0]):
                _, chosen = torch.topk(confidence[row], k=per_step[i])
                x[row, chosen] = x0[row, chosen]
    return x


def test_num_transfer_tokens_spreads_evenly_first_steps_larger():
    masked = torch.ones(2, 10, dtype=torch.bool)
    masked[1, 7:] = False
    schedule = num_transfer_tokens(masked, 4)
    assert schedule.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]


@pytest.mark.parametrize("steps, gen_length, block_length", [(8, 8, 8), (4, 8, 8), (8, 8, 4), (6, 12, 4)])
def test_matches_llada_reference(steps, gen_length, block_length):
    prompt = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(0))
    config = DiffusionSamplingConfig(gen_length=gen_length, steps=steps, block_length=block_length)
    output = diffusion_generate(content_logits, prompt, MASK, config)
    expected = llada_reference_generate(prompt, steps, gen_length, block_length)
    assert torch.equal(output.sequences, expected)
    assert output.steps == steps and not (output.generated == MASK).any()


def test_commit_schedule_blocks_and_hook():
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(1))
    config = DiffusionSamplingConfig(gen_length=12, steps=9, block_length=4)  # 3 blocks x 3 steps: 2, 1, 1
    recorded: list[TrajectoryStep] = []
    output = diffusion_generate(content_logits, prompt, MASK, config, trajectory_hook=recorded.append)
    assert len(recorded) == 9 and output.steps_per_block == [3, 3, 3]
    for step in recorded:
        counts = step.committed.sum(1).tolist()
        assert counts == [[2, 1, 1][step.step % 3]] * 2
        block_start = 4 + 4 * step.block
        committed_cols = step.committed.nonzero()[:, 1]
        assert ((committed_cols >= block_start) & (committed_cols < block_start + 4)).all()
        assert torch.equal(step.canvas != MASK, (step.input_ids != MASK) | step.committed)
        # Nothing committed is ever re-masked.
        assert ((step.input_ids != MASK) <= (step.canvas != MASK)).all()
    assert recorded[0].mask_ratio.tolist() == [1.0, 1.0]
    assert torch.equal(recorded[-1].canvas, output.sequences)


def test_deterministic_and_seeded_sampling():
    prompt = torch.randint(0, MASK, (4, 3), generator=torch.Generator().manual_seed(2))
    greedy = DiffusionSamplingConfig(gen_length=8, steps=8)
    assert torch.equal(
        diffusion_generate(content_logits, prompt, MASK, greedy).sequences,
        diffusion_generate(content_logits, prompt, MASK, greedy).sequences,
    )
    outputs = {}
    for seed in (0, 0, 1):
        config = DiffusionSamplingConfig(gen_length=8, steps=8, temperature=1.0, seed=seed)
        outputs.setdefault(seed, []).append(diffusion_generate(content_logits, prompt, MASK, config).generated)
    assert torch.equal(outputs[0][0], outputs[0][1])
    assert not torch.equal(outputs[0][0], outputs[1][0])
    assert not torch.equal(outputs[0][0], diffusion_generate(content_logits, prompt, MASK, greedy).generated)


def test_random_remasking_changes_order_not_counts():
    prompt = torch.randint(0, MASK, (2, 3), generator=torch.Generator().manual_seed(3))
    recorded = []
    config = DiffusionSamplingConfig(gen_length=8, steps=4, remasking="random", seed=5)
    diffusion_generate(content_logits, prompt, MASK, config, trajectory_hook=recorded.append)
    assert [s.committed.sum(1).tolist() for s in recorded] == [[2, 2]] * 4
    low = []
    diffusion_generate(content_logits, prompt, MASK, DiffusionSamplingConfig(gen_length=8, steps=4), trajectory_hook=low.append)
    assert any(not torch.equal(a.committed, b.committed) for a, b in zip(recorded, low))


def test_threshold_decoding_never_commits_the_mask_token():
    """A model whose favourite token is the mask itself still finishes every block in <= block_length steps."""
    prompt = torch.randint(0, MASK, (2, 3), generator=torch.Generator().manual_seed(5))

    def mask_loving(input_ids, attention_mask=None):
        logits = content_logits(input_ids)
        logits[:, :, MASK] += 50.0
        return logits

    config = DiffusionSamplingConfig(gen_length=8, block_length=4, threshold=0.9)
    output = diffusion_generate(mask_loving, prompt, MASK, config)
    assert not (output.generated == MASK).any()
    assert all(steps <= 4 for steps in output.steps_per_block)


def mask_loving(input_ids, attention_mask=None):
    """A model whose favourite token is the mask itself, by far, everywhere."""
    logits = content_logits(input_ids)
    logits[:, :, MASK] = 50.0
    return logits


@pytest.mark.parametrize(
    "settings",
    [
        dict(gen_length=8, steps=8),
        dict(gen_length=8, steps=4, block_length=4),
        dict(gen_length=8, steps=2, block_length=4),
        dict(gen_length=8, steps=32, block_length=4),
        dict(gen_length=8, steps=8, temperature=0.8, seed=1),
        dict(gen_length=8, steps=4, remasking="random", seed=2),
        dict(gen_length=8, steps=4, cfg_scale=1.0),
        dict(gen_length=8, block_length=4, threshold=0.5),
    ],
)
def test_no_mask_token_survives_even_when_the_model_prefers_it(settings):
    """Every decoding mode fills every generated position with a real token, each in its block's
    scheduled number of steps; the proposal is the best token other than the mask."""
    prompt = torch.randint(0, MASK, (3, 4), generator=torch.Generator().manual_seed(6))
    config = DiffusionSamplingConfig(**settings)
    recorded = []
    output = diffusion_generate(mask_loving, prompt, MASK, config, trajectory_hook=recorded.append)
    assert not (output.generated == MASK).any()
    assert all(not (step.canvas[step.committed] == MASK).any() for step in recorded)
    if config.threshold is None:
        assert output.steps_per_block == [min(config.steps_per_block, config.block_length)] * config.num_blocks
    if config.temperature == 0 and config.cfg_scale == 0:
        for step in recorded:  # greedy: each committed token is the best one but the mask
            runner_up = mask_loving(step.input_ids)[..., :MASK].argmax(-1)  # MASK is the last id
            assert torch.equal(step.canvas[step.committed], runner_up[step.committed])


def test_more_steps_than_tokens_run_no_extra_step_and_allocate_nothing_per_step():
    """`steps` beyond one token per step change nothing, even absurdly many (no [batch, steps] schedule)."""
    prompt = torch.randint(0, MASK, (2, 3), generator=torch.Generator().manual_seed(7))
    one_per_step = DiffusionSamplingConfig(gen_length=6, steps=6, block_length=3)
    plain = diffusion_generate(content_logits, prompt, MASK, one_per_step)
    absurd = DiffusionSamplingConfig(gen_length=6, steps=2 * 10**13, block_length=3)
    huge = diffusion_generate(content_logits, prompt, MASK, absurd)
    assert torch.equal(huge.sequences, plain.sequences) and huge.steps_per_block == [3, 3]


def test_a_prompt_with_the_mask_token_is_refused_not_filled_in():
    prompt = torch.tensor([[1, 2, 3, 4], [0, 5, MASK, 7]])
    with pytest.raises(InputError, match=f"prompt 1 contains the mask token id {MASK} at position 2"):
        diffusion_generate(content_logits, prompt, MASK, DiffusionSamplingConfig(gen_length=4))
    padded = torch.tensor([[1, 2, 3, 4], [MASK, 5, 6, 7]])
    with pytest.raises(ValueError, match=f"prompt 1 is padded with the mask token id {MASK}"):
        diffusion_generate(content_logits, padded, MASK, DiffusionSamplingConfig(gen_length=4),
                           attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))


@pytest.mark.parametrize("threshold", [None, 0.9])
def test_non_finite_logits_stop_decoding_with_an_error(threshold):
    """NaN confidence can never be selected: an error, not masks left behind or a loop without end."""
    calls = []

    def broken(input_ids, attention_mask=None):
        calls.append(1)
        assert len(calls) < 50, "decoding does not stop"
        logits = content_logits(input_ids)
        logits[:, -1] = float("nan")
        return logits

    prompt = torch.randint(0, MASK, (1, 3), generator=torch.Generator().manual_seed(8))
    config = DiffusionSamplingConfig(gen_length=4, threshold=threshold)
    with pytest.raises(RuntimeError, match="logits are not finite at 1 masked position"):
        diffusion_generate(broken, prompt, MASK, config)


def test_threshold_commits_all_confident_and_at_least_one():
    prompt = torch.randint(0, MASK, (2, 3), generator=torch.Generator().manual_seed(4))

    def peaked(input_ids, attention_mask=None):
        logits = content_logits(input_ids)
        logits[:, :, 3] += 12.0 * (torch.arange(input_ids.shape[1]) % 2 == 0)  # confident on even positions
        return logits

    recorded = []
    config = DiffusionSamplingConfig(gen_length=8, steps=8, threshold=0.9)
    output = diffusion_generate(peaked, prompt, MASK, config, trajectory_hook=recorded.append)
    assert output.steps < 8 and not (output.generated == MASK).any()
    for step in recorded:
        probs = torch.softmax(peaked(step.input_ids).double(), -1).max(-1).values
        confident = (probs >= 0.9) & (step.input_ids == MASK)
        assert (confident <= step.committed).all()
        still_masked = (step.input_ids[:, 3:] == MASK).any(1)
        assert (step.committed.sum(1)[still_masked] >= 1).all()


def test_classifier_free_guidance_masks_the_prompt_in_the_unconditional_pass():
    prompt = torch.tensor([[1, 2, 3]])
    seen = []

    def spy(input_ids, attention_mask=None):
        seen.append(input_ids.clone())
        return content_logits(input_ids)

    config = DiffusionSamplingConfig(gen_length=4, steps=2, cfg_scale=1.5)
    diffusion_generate(spy, prompt, MASK, config)
    assert len(seen) == 2 and seen[0].shape[0] == 2
    assert (seen[0][1, :3] == MASK).all() and torch.equal(seen[0][0, :3], prompt[0])
    plain = diffusion_generate(content_logits, prompt, MASK, DiffusionSamplingConfig(gen_length=4, steps=2))
    guided = diffusion_generate(content_logits, prompt, MASK, config)
    assert plain.sequences.shape == guided.sequences.shape


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gen_length": 0}, "gen_length must be a positive integer, got 0"),
        ({"gen_length": 8, "block_length": 3}, "block_length=3 does not divide gen_length=8"),
        ({"gen_length": 8, "block_length": 4, "steps": 3}, "steps=3 is not divisible by the number of blocks 2"),
        ({"gen_length": 8, "remasking": "lowest"}, "remasking must be"),
        ({"gen_length": 8, "threshold": 1.5}, "threshold must be in"),
        ({"gen_length": 8, "temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"gen_length": 8, "temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ({"gen_length": 8, "cfg_scale": float("inf")}, "cfg_scale must be a finite number >= 0, got inf"),
        ({"gen_length": 8, "threshold": float("nan")}, "threshold must be in"),
        ({"gen_length": True}, "gen_length must be a positive integer, got True"),
        ({"gen_length": 8, "steps": 8.0}, "steps must be a positive integer, got 8.0"),
        ({"gen_length": 8, "seed": 10**23}, "seed must be an integer in"),
        ({"gen_length": 8, "seed": -(2**63) - 1}, "seed must be an integer in"),
        ({"gen_length": 8, "top_k": 0}, "top_k must be a positive integer, got 0"),
        ({"gen_length": 8, "top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"gen_length": 8, "logprobs": 21}, r"logprobs must be an integer in \[0, 20\], got 21"),
        ({"gen_length": 8, "logprobs": True}, r"logprobs must be an integer in \[0, 20\], got True"),
    ],
)
def test_bad_settings_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionSamplingConfig(**kwargs)


def test_batched_left_padded_prompts_equal_one_by_one(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    directory, config, _ = tiny_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    logits_fn = hf_logits_fn(model)
    mask, pad = config["mask_token_id"], config["pad_token_id"]
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    settings = DiffusionSamplingConfig(gen_length=6, steps=6, block_length=3)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = diffusion_generate(logits_fn, ids, mask, settings, attention_mask=attention)
    for row, prompt in enumerate(prompts):
        alone = diffusion_generate(logits_fn, torch.tensor([prompt]), mask, settings)
        assert torch.equal(batched.generated[row], alone.generated[0])


@pytest.mark.parametrize(
    "settings",
    [
        dict(gen_length=8, steps=8, block_length=4),
        dict(gen_length=12, steps=6, block_length=4),
        dict(gen_length=8, block_length=4, threshold=0.3),
        dict(gen_length=8, steps=4, cfg_scale=1.5),
        dict(gen_length=8, steps=4, temperature=0.7, seed=3),
        dict(gen_length=8, steps=4, remasking="random", seed=3),
    ],
)
def test_logits_window_gives_the_full_canvas_result(settings):
    """Scoring only where a step can commit changes nothing (greedy), and is not asked for otherwise."""
    prompt = torch.tensor([[1, 2, 3, 4], [0, 5, 6, 7]])
    attention = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    windows = []

    def windowed(input_ids, attention_mask=None, window=None):
        windows.append(window)
        logits = content_logits(input_ids)
        return logits if window is None else logits[:, window[0]:window[1]]

    config = DiffusionSamplingConfig(**settings)
    full, recorded_full = [], []
    reference = diffusion_generate(content_logits, prompt, MASK, config, attention, trajectory_hook=recorded_full.append)
    output = diffusion_generate(windowed, prompt, MASK, config, attention, trajectory_hook=full.append, logits_window=True)
    assert torch.equal(output.sequences, reference.sequences) and output.steps == reference.steps
    assert all(torch.equal(a.committed, b.committed) for a, b in zip(full, recorded_full))
    greedy = config.temperature == 0 and config.remasking == "low_confidence"
    assert all((window is not None) == greedy for window in windows)
    if greedy:
        assert windows[0] == (4, 4 + config.block_length)  # from the first masked position to the block's end
        assert windows[-1][1] == 4 + config.gen_length and all(lo >= 4 for lo, _ in windows)
        assert [lo for lo, _ in windows] == sorted(lo for lo, _ in windows)  # the window only shrinks from the left


def test_llada_logits_to_keep_runs_the_head_on_the_window_only(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    directory, config, _ = tiny_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(0, config["vocab_size"] - 2, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 7:] = config["mask_token_id"]
    full = model(input_ids=ids).logits
    torch.testing.assert_close(hf_logits_fn(model)(ids, None, window=(5, 10)), full[:, 5:10])
    assert model(input_ids=ids, logits_to_keep=3).logits.shape == (2, 3, config["embedding_size"])
    settings = DiffusionSamplingConfig(gen_length=8, steps=8, block_length=4)
    windowed = diffusion_generate(hf_logits_fn(model), ids[:, :6], config["mask_token_id"], settings, logits_window=True)
    plain = diffusion_generate(hf_logits_fn(model), ids[:, :6], config["mask_token_id"], settings)
    assert torch.equal(windowed.sequences, plain.sequences)


def _confidence(probs: torch.Tensor, chosen: torch.Tensor, rule: str) -> torch.Tensor:
    """Dream's confidence rules (its `alg`), written out independently of the sampler."""
    if rule in ("low_confidence", "maskgit_plus"):
        return probs.gather(-1, chosen[..., None]).squeeze(-1)
    if rule == "topk_margin":
        ordered = probs.sort(-1, descending=True).values
        return ordered[..., 0] - ordered[..., 1]
    return -torch.special.entr(probs).sum(-1)  # entropy: the less, the more confident


@pytest.mark.parametrize("rule", ["maskgit_plus", "topk_margin", "entropy"])
def test_confidence_rules_commit_what_dream_would(rule):
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(3))
    gen_length, block_length = 8, 4
    config = DiffusionSamplingConfig(gen_length=gen_length, steps=gen_length, block_length=block_length, remasking=rule)
    output = diffusion_generate(content_logits, prompt, MASK, config, logits_window=False)
    # Reference: one commit per step, the most confident masked position of the current block.
    x = torch.full((2, 4 + gen_length), MASK, dtype=torch.long)
    x[:, :4] = prompt
    for block in range(gen_length // block_length):
        start, end = 4 + block * block_length, 4 + (block + 1) * block_length
        for _ in range(block_length):
            logits = content_logits(x).double()
            chosen = logits.argmax(-1)
            confidence = _confidence(torch.softmax(logits, -1), chosen, rule)
            confidence[:, end:] = -float("inf")
            confidence[x != MASK] = -float("inf")
            position = confidence.argmax(1)
            x[torch.arange(2), position] = chosen[torch.arange(2), position]
    assert torch.equal(output.sequences, x)


def test_confidence_rules_differ_and_windowing_keeps_them_exact():
    prompt = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(4))
    results = {}
    for rule in ("low_confidence", "topk_margin", "entropy"):
        config = DiffusionSamplingConfig(gen_length=12, steps=12, block_length=4, remasking=rule)
        full = diffusion_generate(content_logits, prompt, MASK, config).sequences

        def windowed(ids, mask, window=None):
            logits = content_logits(ids, mask)
            return logits if window is None else logits[:, window[0]:window[1]]

        assert torch.equal(diffusion_generate(windowed, prompt, MASK, config, logits_window=True).sequences, full)
        results[rule] = full
    assert not torch.equal(results["low_confidence"], results["entropy"])  # the rules choose differently


@pytest.mark.parametrize("rule", ["entropy", "random"])
def test_threshold_needs_a_probability_confidence(rule):
    with pytest.raises(ValueError, match="threshold is a probability"):
        DiffusionSamplingConfig(gen_length=4, threshold=0.9, remasking=rule)


def test_top_k_and_top_p_keep_the_most_likely_tokens_and_never_rank_the_mask():
    from starquant_plugin.diffusion.sampler import filter_logits

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 5.0]])  # probabilities 0.015 0.111 0.041 0.009 0.823
    keep = lambda filtered: (filtered > float("-inf")).int().tolist()[0]  # noqa: E731
    assert keep(filter_logits(logits, 2, None)) == [0, 1, 0, 0, 1]
    assert keep(filter_logits(logits, None, 0.8)) == [0, 0, 0, 0, 1]  # the top token alone reaches 0.8
    assert keep(filter_logits(logits, None, 0.9)) == [0, 1, 0, 0, 1]
    assert keep(filter_logits(logits, None, 0.99)) == [1, 1, 1, 0, 1]
    assert keep(filter_logits(logits, 1, None, mask_token_id=4)) == [0, 1, 0, 0, 1]  # k counts real tokens
    assert filter_logits(logits, None, 1.0) is logits and filter_logits(logits, 5, None) is logits


def test_top_k_one_samples_the_argmax_at_any_temperature():
    """Every position proposes its argmax whatever the noise (as Dream, the confidence is then the
    filtered distribution's: 1 everywhere, so commits go left to right)."""
    prompt = torch.tensor([[1, 2, 3]])
    greedy = diffusion_generate(content_logits, prompt, MASK, DiffusionSamplingConfig(gen_length=6, steps=6, top_k=1))
    plain = diffusion_generate(content_logits, prompt, MASK, DiffusionSamplingConfig(gen_length=6, steps=6))
    assert not torch.equal(greedy.sequences, plain.sequences)  # the commit order changed, and with it the text
    for seed in range(3):
        sampled = diffusion_generate(content_logits, prompt, MASK, DiffusionSamplingConfig(
            gen_length=6, steps=6, temperature=2.0, top_k=1, seed=seed))
        assert torch.equal(sampled.sequences, greedy.sequences)


def test_stepwise_decoding_is_diffusion_generate_one_step_at_a_time():
    """`diffusion_steps` (streaming) yields every step's canvas; its result is `diffusion_generate`'s."""
    from starquant_plugin.diffusion import diffusion_steps

    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    config = DiffusionSamplingConfig(gen_length=8, steps=8, block_length=4, temperature=1.0, seed=3)
    expected = diffusion_generate(content_logits, prompt, MASK, config)
    steps, canvases = diffusion_steps(content_logits, prompt, MASK, config), []
    while True:
        try:
            step = next(steps)
        except StopIteration as finished:
            output = finished.value
            break
        canvases.append(step.canvas)
        assert torch.is_grad_enabled()  # each resumption's no_grad does not leak to the caller
    assert torch.equal(output.sequences, expected.sequences) and output.steps == expected.steps == len(canvases)
    assert torch.equal(canvases[-1], expected.sequences)
    for before, after in zip(canvases, canvases[1:]):  # committed tokens stay; one step commits more
        committed = before != MASK
        assert torch.equal(after[committed], before[committed]) and (after != MASK).sum() > committed.sum()


@pytest.mark.parametrize(
    "settings",
    [
        dict(gen_length=8, steps=8, block_length=4),
        dict(gen_length=8, block_length=4, threshold=0.3),
        dict(gen_length=8, steps=4, cfg_scale=1.5),
        dict(gen_length=8, steps=4, temperature=0.7, seed=3, top_k=3),
    ],
)
def test_logprobs_are_the_committing_steps_log_softmax(settings):
    """Each generated token's log-probability is the log-softmax (mask excluded) of the logits of the
    step that committed it, recomputed here from the trajectory; its top alternatives are that
    step's most likely tokens; windowed scoring records the same; nothing else changes."""
    prompt = torch.tensor([[1, 2, 3, 4], [0, 5, 6, 7]])
    attention = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    plain = diffusion_generate(content_logits, prompt, MASK, DiffusionSamplingConfig(**settings), attention)
    config = DiffusionSamplingConfig(**settings, logprobs=3)
    steps = []
    output = diffusion_generate(content_logits, prompt, MASK, config, attention, trajectory_hook=steps.append)
    assert torch.equal(output.sequences, plain.sequences)  # recording changes no decision
    assert not output.logprobs.token.isnan().any()
    before = torch.cat([prompt, torch.full((2, 8), MASK)], dim=1)
    assert sum(int(step.committed.sum()) for step in steps) == 16
    for step in steps:
        logits = content_logits(before).double()
        if config.cfg_scale:
            prompt_positions = torch.zeros_like(before, dtype=torch.bool)
            prompt_positions[:, :4] = attention.bool()  # padding is not part of the prompt
            uncond = content_logits(before.masked_fill(prompt_positions, MASK)).double()
            logits = uncond + (config.cfg_scale + 1) * (logits - uncond)
        logits[..., MASK] = float("-inf")
        expected = torch.log_softmax(logits, dim=-1)
        for row, position in step.committed.nonzero().tolist():
            slot = position - 4
            token = int(step.canvas[row, position])
            assert output.logprobs.token[row, slot].item() == pytest.approx(expected[row, position, token].item(), abs=1e-4)
            top = expected[row, position].topk(3)
            assert output.logprobs.top_ids[row, slot].tolist() == top.indices.tolist()
            torch.testing.assert_close(output.logprobs.top[row, slot].double(), top.values, atol=1e-4, rtol=0)
        before = step.canvas

    def windowed(input_ids, attention_mask=None, window=None):
        logits = content_logits(input_ids)
        return logits if window is None else logits[:, window[0]:window[1]]

    narrow = diffusion_generate(windowed, prompt, MASK, config, attention, logits_window=True)
    assert torch.equal(narrow.sequences, output.sequences)
    torch.testing.assert_close(narrow.logprobs.token, output.logprobs.token)
    assert torch.equal(narrow.logprobs.top_ids, output.logprobs.top_ids)
    assert diffusion_generate(content_logits, prompt, MASK, DiffusionSamplingConfig(**settings)).logprobs is None
