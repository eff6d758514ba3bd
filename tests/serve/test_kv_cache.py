"""Approximate key/value caching of block-wise decoding (`cache: prefix | dual`) on a real vLLM engine.

The mechanism is exact when the cache is refreshed every step (the same tokens as without cache,
on both shipped models and on a STaR-Quant checkpoint, whose SGAT/TAC must then see the whole
canvas's states); refreshed once per block it is an approximation whose exact match on the shipped
models is measured against decoding without cache.
"""

from dataclasses import replace

import pytest

pytest.importorskip("vllm", reason="the serve environment (.venv/serve) runs these")

from starquant_plugin.assets import SHIPPED_MODELS  # noqa: E402
from starquant_plugin.evaluation import exact_match, load_tasks  # noqa: E402
from starquant_plugin.serving import DiffusionLLM, DiffusionSamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

# Generation of several blocks of several steps each: (gen_length, block_length) per family,
# just longer than the family's longest held-out answer.
SETTINGS = {"llada": (6, 3), "dream": (10, 5)}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cache_modes_on_the_shipped_models(family):
    examples = load_tasks(SHIPPED_MODELS[family] / "eval.jsonl")[:100]
    prompts = [e.prompt for e in examples]
    gen_length, block_length = SETTINGS[family]
    plain = DiffusionSamplingParams(gen_length=gen_length, steps=gen_length, block_length=block_length)

    def accuracy(completions) -> float:
        return 100 * sum(exact_match(c.text, e.answer) for c, e in zip(completions, examples)) / len(examples)

    with DiffusionLLM(SHIPPED_MODELS[family]) as llm:
        reference = llm.generate(prompts, plain)
        assert accuracy(reference) >= 95
        for mode in ("prefix", "dual"):
            exact = llm.generate(prompts, replace(plain, cache=mode, cache_refresh_steps=1))
            assert [c.token_ids for c in exact] == [c.token_ids for c in reference], mode
            cached = llm.generate(prompts, replace(plain, cache=mode))
            assert accuracy(cached) >= accuracy(reference) - 1, mode
        fast = llm.generate(prompts, replace(plain, cache="dual", threshold=0.9))
        assert accuracy(fast) >= accuracy(reference) - 1
        assert fast[0].steps < reference[0].steps


def test_cache_on_a_starquant_checkpoint_refreshed_every_step_is_exact(starquant_w8a8_checkpoint):
    prompts = ["abc", "hello world", "q", "12+34="]
    plain = DiffusionSamplingParams(gen_length=8, steps=8, block_length=4)
    with DiffusionLLM(starquant_w8a8_checkpoint) as llm:
        reference = [c.token_ids for c in llm.generate(prompts, plain)]
        for mode in ("prefix", "dual"):
            exact = llm.generate(prompts, replace(plain, cache=mode, cache_refresh_steps=1))
            assert [c.token_ids for c in exact] == reference, mode
        # Sampling (noise drawn over the whole canvas, zero logits outside the computed positions)
        # and classifier-free guidance (two canvases per prompt) go through the cache too.
        for extra in ({"temperature": 0.8, "seed": 3}, {"cfg_scale": 1.0}):
            expected = [c.token_ids for c in llm.generate(prompts, replace(plain, **extra))]
            got = llm.generate(prompts, replace(plain, cache="dual", cache_refresh_steps=1, **extra))
            assert [c.token_ids for c in got] == expected, extra


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache": "both"}, "cache must be one of none, prefix, dual, got 'both'"),
        ({"cache": "dual", "cache_refresh_steps": 0}, "cache_refresh_steps must be a positive integer, got 0"),
        ({"cache_refresh_steps": 2}, "cache_refresh_steps needs cache: prefix or dual"),
    ],
)
def test_bad_cache_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionSamplingParams(gen_length=4, **kwargs)
