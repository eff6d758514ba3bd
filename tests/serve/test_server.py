"""`starquant serve`: OpenAI-compatible completions (chat, streaming) over a real vLLM engine, on loopback.

The batching policy is unit-tested on `DiffusionBatcher` with a slow stand-in generator, and
the event loop's freedom on the app with a slow stand-in tokenizer (no engine); everything
else talks HTTP to one real `starquant serve` subprocess.
"""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from starquant_plugin.cli import main
from starquant_plugin.diffusion import DiffusionSamplingConfig
from starquant_plugin.errors import InputError
from starquant_plugin.evaluation import core_generate_fn
from starquant_plugin import load as load_checkpoint
from starquant_plugin.serving.server import DiffusionBatcher, Overloaded, build_app
from tests.conftest import random_hub_tensors, serve_subprocess, tiny_config, tiny_tokenizer, write_hub_checkpoint

httpx = pytest.importorskip("httpx")
pytest.importorskip("vllm", reason="the serve environment (.venv/serve) runs these")


@dataclass
class _Completion:
    text: str
    token_ids: list
    logprobs: list | None = None


def test_batcher_groups_equal_settings_and_refuses_overload():
    calls = []

    def slow_generate(prompts, sampling, add_special_tokens=True):
        calls.append((list(prompts), sampling.seed, add_special_tokens))
        time.sleep(0.2)
        return [_Completion(p.upper(), []) for p in prompts]

    async def scenario():
        batcher = DiffusionBatcher(slow_generate, max_batch_size=3, max_pending=5)
        batcher.start()
        greedy, other = DiffusionSamplingConfig(gen_length=2), DiffusionSamplingConfig(gen_length=2, seed=9)
        first = asyncio.ensure_future(batcher.submit(["a"], greedy))
        await asyncio.sleep(0.05)  # "a" is decoding; the next ones wait together
        rest = [asyncio.ensure_future(batcher.submit([p], s, add_special_tokens=special))
                for p, s, special in (("b", greedy, True), ("c", other, True), ("d", greedy, True), ("e", greedy, False))]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(["f", "g"], greedy)  # 4 waiting + 2 > max_pending
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert [[c.text for c in r] for r in results] == [["A"], ["B"], ["C"], ["D"], ["E"]]
    # b and d share settings and ride one call; c runs on its own, and so does the chat prompt e
    # (its template wrote its special tokens: tokenized without adding them).
    assert calls == [(["a"], 0, True), (["b", "d"], 0, True), (["c"], 9, True), (["e"], 0, False)]


def test_batcher_refuses_a_request_that_could_never_be_admitted():
    """More prompts than max_pending is the request's fault (400), not a full queue (503, retry)."""

    async def scenario():
        batcher = DiffusionBatcher(lambda prompts, sampling, add_special_tokens=True: [], max_batch_size=2, max_pending=4)
        batcher.start()
        try:
            with pytest.raises(InputError, match="5 prompts in one request exceed max_pending=4"):
                await batcher.submit(list("abcde"), DiffusionSamplingConfig(gen_length=2))
        finally:
            await batcher.stop()

    asyncio.run(scenario())


class _SlowTokenizer:
    """The tiny character tokenizer, taking 1.5 s over a text that starts with "slow"."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, text, **kwargs):
        if isinstance(text, str) and text.startswith("slow"):
            time.sleep(1.5)
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


class _StandInLLM:
    """What `build_app` needs of a `DiffusionLLM`, without an engine."""

    max_sequence_length = 64

    def __init__(self):
        config = tiny_config()
        self.tokenizer, self.mask_token_id = _SlowTokenizer(tiny_tokenizer(config)), config["mask_token_id"]

    def generate(self, prompts, sampling, add_special_tokens=True):
        return [_Completion(p[::-1], [0] * sampling.gen_length) for p in prompts]


def test_health_answers_while_a_request_is_being_tokenized():
    """Parsing and tokenizing run off the event loop: a slow request holds up nothing else."""
    from fastapi.testclient import TestClient

    with TestClient(build_app(_StandInLLM(), "stand-in")) as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/v1/completions", json={"prompt": "slow abc", "max_tokens": 2})
        time.sleep(0.3)  # the slow request is in its tokenizer now
        started = time.perf_counter()
        health = client.get("/health")
        waited = time.perf_counter() - started
        assert health.status_code == 200 and waited < 0.5 and not slow.done()
        done = slow.result(timeout=30)
        assert done.status_code == 200 and done.json()["choices"][0]["text"] == "cba wols"
        assert done.json()["usage"]["prompt_tokens"] == len("slow abc") + 1  # BOS


def test_declared_body_size_over_the_limit_is_refused_before_reading():
    from fastapi.testclient import TestClient

    with TestClient(build_app(_StandInLLM(), "stand-in", max_body_bytes=1000)) as client:
        claimed = client.post("/v1/completions", content=b"{}", headers={"content-length": str(10**12)})
        assert claimed.status_code == 413
        assert "exceeds the limit of 1000 bytes (max_body_bytes)" in claimed.json()["error"]["message"]
        bogus = client.post("/v1/completions", content=b"{}", headers={"content-length": "lots"})
        assert bogus.status_code == 400 and "Content-Length" in bogus.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2}).status_code == 200


def test_serve_refuses_a_body_limit_that_is_not_positive(capsys):
    assert main(["serve", "--max-body-bytes", "0"]) == 2
    assert "--max-body-bytes out of range: 0" in capsys.readouterr().err


MAX_BODY_BYTES = 256 * 1024  # room for the 100k-deep JSON below (200 kB)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = tiny_config(n_kv_heads=2)
    directory = write_hub_checkpoint(tmp_path_factory.mktemp("server") / "tiny", config, random_hub_tensors(config, seed=7))
    with serve_subprocess(directory, "--served-model-name", "tiny", "--max-pending", "4",
                          "--max-body-bytes", str(MAX_BODY_BYTES)) as base:
        yield base, directory


def _complete(base, **body):
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


@pytest.mark.slow
def test_completions_match_core_under_a_concurrent_burst(server):
    base, directory = server
    models = httpx.get(f"{base}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    prompts = ["abc", "hello world", "q", "12+34="]
    model, tokenizer = load_checkpoint(directory)
    expected = core_generate_fn(model, tokenizer, model.config.mask_token_id)(
        prompts, DiffusionSamplingConfig(gen_length=6, steps=6, block_length=3)
    )
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(
            lambda p: _complete(base, model="tiny", prompt=p, max_tokens=6, steps=6, block_length=3), prompts
        ))
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    body = responses[0].json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 6
    # A list prompt is one request with several choices.
    listed = _complete(base, prompt=prompts, max_tokens=6, steps=6, block_length=3).json()
    assert [c["text"] for c in listed["choices"]] == expected and [c["index"] for c in listed["choices"]] == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"max_tokens": 4}, 400, "prompt"),
        ({"prompt": "abc", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "abc", "max_tokens": 8, "block_length": 3}, 400, "does not divide"),
        ({"prompt": "abc", "max_tokens": 8, "steps": 3, "block_length": 4}, 400, "steps"),
        ({"prompt": "abc", "max_tokens": 4, "block_lenght": 2}, 400, "block_lenght"),
        ({"prompt": "abc", "max_tokens": 4, "stream": True, "n": 2}, 400, "n: a streamed request decodes one sample"),
        ({"prompt": "abc", "max_tokens": 4, "stream_canvas": True}, 400, "stream_canvas: needs stream: true"),
        ({"prompt": "abc", "max_tokens": 4, "remasking": "sometimes"}, 400, "remasking"),
        ({"prompt": "abc", "max_tokens": 4, "threshold": 2.0}, 400, "threshold"),
        ({"prompt": "abc", "max_tokens": 1000}, 400, "max_sequence_length"),
        ({"prompt": "a" * 250, "max_tokens": 8}, 400, "prompt: 251 prompt tokens + max_tokens 8 exceeds"),
        ({"prompt": [], "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "abc", "model": "other"}, 404, "not served"),
        # Bounds: the canvas (max_sequence_length=256 here), the seed's range.
        ({"prompt": "abc", "max_tokens": 10**13}, 400, "max_tokens: 10000000000000 exceeds the model's max_sequence"),
        ({"prompt": "abc", "steps": 10**13}, 400, "steps: 10000000000000 exceeds the model's max_sequence_length=256"),
        ({"prompt": "abc", "block_length": 4096}, 400, "block_length: 4096 exceeds"),
        ({"prompt": "abc", "seed": 10**23}, 400, "seed: Input should be less than or equal to 9223372036854775807"),
        ({"prompt": "abc", "seed": -1}, 400, "seed: Input should be greater than or equal to 0"),
        # Strict types: a boolean is not a number, a string not an integer.
        ({"prompt": "abc", "max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
        ({"prompt": "abc", "steps": False}, 400, "steps"),
        ({"prompt": "abc", "temperature": True}, 400, "temperature: Input should be a valid number"),
        ({"prompt": "abc", "seed": "7"}, 400, "seed: Input should be a valid integer"),
        ({"prompt": "abc", "n": True}, 400, "n: Value error, must be an integer"),
        ({"prompt": "abc", "n": 0}, 400, "n: Input should be greater than or equal to 1"),
        ({"prompt": ["abc", "ab"], "n": 3}, 400, "prompt: 2 prompts x n=3 samples in one request exceed max_pending=4"),
        ({"prompt": "abc", "seed": 2**63 - 1, "n": 2}, 400, "seed: 9223372036854775807 + n - 1 exceeds"),
        ({"prompt": "abc", "top_k": 0}, 400, "top_k: Input should be greater than 0"),
        ({"prompt": "abc", "top_p": 1.5}, 400, "top_p: Input should be less than or equal to 1"),
        ({"prompt": "abc", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop: Value error, at most 4 non-empty strings"),
        ({"prompt": "abc", "stop": ""}, 400, "stop: Value error, at most 4 non-empty strings"),
        ({"prompt": "abc", "cache": "both"}, 400, "cache: Input should be 'none', 'prefix' or 'dual'"),
        ({"prompt": "abc", "cache_refresh_steps": 2}, 400, "cache_refresh_steps needs cache: prefix or dual"),
        ({"prompt": "abc", "logprobs": 21}, 400, "logprobs: Input should be less than or equal to 20"),
        ({"prompt": "abc", "logprobs": True}, 400, "logprobs: Input should be a valid integer"),
        # Fields that cannot apply are refused by name.
        ({"prompt": "abc", "best_of": 2}, 400, "best_of: Extra inputs are not permitted"),
        ({"prompt": "abc", "echo": True}, 400, "echo: Extra inputs are not permitted"),
        ({"prompt": "abc", "stream": 0}, 400, "stream: Value error, must be a boolean"),
        # Prompts the model cannot read as written.
        ({"prompt": "ab\u00e9c", "max_tokens": 2}, 400, "prompt: character 'é' (U+00E9) at position 2 is not in the"),
        ({"prompt": ["abc", "aBc"], "max_tokens": 2}, 400, "prompt[1]: character 'B' (U+0042) at position 1"),
        ({"prompt": "ab<|mdm_mask|>c", "max_tokens": 2}, 400, "prompt: contains the mask token '<|mdm_mask|>' (id 49)"),
        # More prompts than the server ever queues (--max-pending 4): the request's fault, not a full queue.
        ({"prompt": ["abc"] * 5, "max_tokens": 2}, 400, "prompt: 5 prompts in one request exceed max_pending=4"),
    ],
)
def test_malformed_requests_are_answered_and_the_server_keeps_going(server, body, status, message):
    base, _ = server
    response = _complete(base, **body)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    assert _complete(base, prompt="abc", max_tokens=2).status_code == 200


@pytest.mark.slow
def test_openai_sampling_fields(server):
    """n samples with seeds seed, seed + 1; top_k=1 (and a tiny top_p) proposes the argmax whatever
    the temperature; stop cuts the text; max_tokens defaults to 16 (no generation_config.json
    max_new_tokens here)."""
    base, _ = server
    sampled = dict(prompt="abc", max_tokens=8, steps=8, block_length=4, temperature=1.0)
    alone = [_complete(base, **sampled, seed=s).json()["choices"][0]["text"] for s in (5, 6)]
    assert alone[0] != alone[1]  # the seeds matter at temperature 1 (random weights: a flat distribution)
    both = _complete(base, **sampled, seed=5, n=2).json()
    assert [c["text"] for c in both["choices"]] == alone and [c["index"] for c in both["choices"]] == [0, 1]
    greedy = _complete(base, **{**sampled, "temperature": 0.0}, top_k=1).json()["choices"][0]["text"]
    assert _complete(base, **sampled, top_k=1).json()["choices"][0]["text"] == greedy
    assert _complete(base, **sampled, top_p=1e-9).json()["choices"][0]["text"] == greedy
    cut = alone[0][len(alone[0]) // 2:][:1]  # a character of the second half
    stopped = _complete(base, **sampled, seed=5, stop=[cut, "never"]).json()["choices"][0]
    assert stopped == {"index": 0, "text": alone[0][:alone[0].index(cut)], "finish_reason": "stop", "logprobs": None}
    unstopped = _complete(base, **sampled, seed=5, stop="never").json()["choices"][0]
    assert unstopped["text"] == alone[0] and unstopped["finish_reason"] == "length"
    default = _complete(base, prompt="abc", steps=16, block_length=16).json()
    assert default["usage"]["completion_tokens"] == 16


@pytest.mark.slow
def test_logprobs_are_the_core_samplers_and_follow_the_text(server):
    """`logprobs: k`: per token of the text its string, log-probability (the core sampler's, on the
    same checkpoint), offset and its position's k most likely tokens (with the chosen one); cut with
    the text by `stop`; streamed, the chunks' tokens are the non-streamed ones."""
    import torch

    from starquant_plugin.diffusion import diffusion_generate, hf_logits_fn

    base, directory = server
    settings = dict(max_tokens=8, steps=4, block_length=4)
    body = _complete(base, prompt="abc", logprobs=3, **settings).json()
    (choice,) = body["choices"]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    lengths = [len(token) for token in logprobs["tokens"]]
    assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
    model, tokenizer = load_checkpoint(directory)
    ids = tokenizer(["abc"], return_tensors="pt")["input_ids"]
    core = diffusion_generate(hf_logits_fn(model), ids, model.config.mask_token_id,
                              DiffusionSamplingConfig(gen_length=8, steps=4, block_length=4, logprobs=3))
    special = set(tokenizer.all_special_ids)
    kept = [i for i, token in enumerate(core.generated[0].tolist()) if token not in special]
    assert logprobs["tokens"] == [tokenizer.decode([core.generated[0, i]]) for i in kept]
    torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"]), core.logprobs.token[0, kept], atol=2e-4, rtol=0)
    for position, token, value, top in zip(kept, logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        expected = {tokenizer.decode([t]): v for t, v in zip(core.logprobs.top_ids[0, position].tolist(),
                                                             core.logprobs.top[0, position].tolist())}
        assert top == pytest.approx({**expected, token: value}, abs=2e-4)
        assert value == pytest.approx(core.logprobs.top[0, position, 0].item(), abs=2e-4)  # greedy: the best token
    text = choice["text"]
    cut = text[len(text) // 2]
    stopped = _complete(base, prompt="abc", logprobs=0, stop=cut, **settings).json()["choices"][0]
    assert stopped["text"] == text[:text.index(cut)]
    assert stopped["logprobs"]["tokens"] == [t for t, at in zip(logprobs["tokens"], logprobs["text_offset"])
                                             if at < text.index(cut)]
    assert [list(top) for top in stopped["logprobs"]["top_logprobs"]] == [[t] for t in stopped["logprobs"]["tokens"]]
    streamed = [c for e in _stream(base, prompt="abc", logprobs=3, **settings) for c in e["choices"]]
    assert sum((c["logprobs"]["tokens"] for c in streamed), []) == logprobs["tokens"]
    assert sum((c["logprobs"]["text_offset"] for c in streamed), []) == logprobs["text_offset"]
    assert _complete(base, prompt="abc", **settings).json()["choices"][0]["logprobs"] is None


@pytest.mark.slow
def test_non_json_body_is_400(server):
    base, _ = server
    response = httpx.post(f"{base}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"prompt": "abc", "temperature": NaN}', "temperature: Input should be a finite number"),
        (b'{"prompt": "abc", "cfg_scale": Infinity}', "cfg_scale: Input should be a finite number"),
        (b'{"prompt": "abc", "threshold": -Infinity}', "threshold: Input should be a finite number"),
        (b'{"prompt": "ab\\ud800c"}', "prompt: character at position 2 is a lone surrogate (U+D800)"),
        (b'{"prompt": "abc", "\\udfff": 1}', "request body: Input should be a valid string"),  # a key
        (b"[" * 100_000 + b"]" * 100_000, "request body: JSON nested too deeply"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "request body: JSON nested too deeply"),
        (b"\xff\xfe{}", "request body is not valid JSON"),
        (b'["abc"]', "request body: Input should be a valid dictionary"),
    ],
)
def test_hostile_bodies_are_400_naming_the_field(server, body, message):
    base, _ = server
    response = httpx.post(f"{base}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert _complete(base, prompt="abc", max_tokens=2).status_code == 200


@pytest.mark.slow
def test_integers_are_fine_floats(server):
    base, _ = server
    response = _complete(base, prompt="abc", max_tokens=2, temperature=1, cfg_scale=0, threshold=1)
    assert response.status_code == 200 and len(response.json()["choices"]) == 1


@pytest.mark.slow
def test_bodies_over_the_limit_are_413_naming_it(server):
    """Refused by Content-Length, and by counting a chunked upload that declares no length."""
    base, _ = server
    padding = "a" * MAX_BODY_BYTES
    declared = httpx.post(f"{base}/v1/completions", json={"prompt": padding, "max_tokens": 2}, timeout=60)
    assert declared.status_code == 413
    assert f"exceeds the limit of {MAX_BODY_BYTES} bytes (max_body_bytes)" in declared.json()["error"]["message"]

    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 1):
            yield b"a" * 4096
        yield b'", "max_tokens": 2}'

    streamed = httpx.post(f"{base}/v1/completions", content=chunks(), timeout=60)
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    assert streamed.status_code == 413 and str(MAX_BODY_BYTES) in streamed.json()["error"]["message"]
    assert httpx.get(f"{base}/health").status_code == 200
    assert _complete(base, prompt="abc", max_tokens=2).status_code == 200


@pytest.mark.slow
def test_overload_is_503_not_a_crash(server):
    base, _ = server
    # Distinct seeds: no two requests share a batch, so they queue behind each other.
    slow = [dict(prompt="abc", max_tokens=128, steps=128, temperature=1.0, seed=s) for s in range(12)]
    with ThreadPoolExecutor(12) as pool:
        codes = [r.status_code for r in pool.map(lambda b: _complete(base, **b), slow)]
    assert 503 in codes and set(codes) <= {200, 503}
    assert codes.count(200) >= 1
    health = httpx.get(f"{base}/health").json()
    assert health["status"] == "ok" and health["pending_prompts"] == 0
    assert _complete(base, prompt="abc", max_tokens=2).status_code == 200


def _chat(base, **body):
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": [{"role": "user", "content": "abc"}]},
         "messages: this model has no chat template (tokenizer_config.json has no chat_template)"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "robot", "content": "abc"}]}, "messages.0.role: Input should be 'system', 'user' or"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content: Input should be a valid string"),
        ({"prompt": "abc"}, "messages: Field required"),
        ({"messages": [{"role": "user", "content": "abc"}], "stream_canvas": 1}, "stream_canvas: Value error, must be a"),
        ({"messages": [{"role": "user", "content": "abc"}], "top_logprobs": 2}, "top_logprobs: Value error, needs logprobs: true"),
        ({"messages": [{"role": "user", "content": "abc"}], "logprobs": 2}, "logprobs: Input should be a valid boolean"),
    ],
)
def test_chat_requests_without_a_template_or_with_bad_messages_are_400(server, body, message):
    base, _ = server  # a model whose tokenizer has no chat template
    response = _chat(base, **body)
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert _complete(base, prompt="abc", max_tokens=2).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_chat_completions_answer_through_the_shipped_chat_template(family):
    """The shipped models' template renders the last user message as their prompt (LLaDA's with
    its BOS, tokenized without adding another): the answers are the held-out ones, and the same
    text /v1/completions gives for the bare prompt."""
    from starquant_plugin.assets import SHIPPED_MODELS
    from starquant_plugin.evaluation import load_tasks

    examples = load_tasks(SHIPPED_MODELS[family] / "eval.jsonl")
    length = max(len(e.answer) for e in examples)  # as `starquant eval` decodes them (one token per character)
    examples = examples[:4]
    with serve_subprocess(SHIPPED_MODELS[family]) as base:
        settings = {"max_tokens": length, "steps": length, "block_length": length}
        for example in examples:
            messages = [{"role": "system", "content": "answer exactly"}, {"role": "user", "content": example.prompt}]
            chat = _chat(base, messages=messages, **settings)
            assert chat.status_code == 200, chat.text
            body = chat.json()
            assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
            (choice,) = body["choices"]
            assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == example.answer
            completion = _complete(base, prompt=example.prompt, **settings).json()
            assert completion["choices"][0]["text"] == example.answer
            assert body["usage"]["prompt_tokens"] == completion["usage"]["prompt_tokens"]  # one BOS, not two
        streamed = _stream(base, "/v1/chat/completions", messages=messages, **settings)
        assert streamed[0]["object"] == "chat.completion.chunk"
        assert streamed[0]["choices"] == [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]
        assert "".join(c["delta"].get("content", "") for e in streamed for c in e["choices"]) == example.answer
        scored = _chat(base, messages=messages, logprobs=True, top_logprobs=2, **settings).json()["choices"][0]
        content = scored["logprobs"]["content"]
        assert "".join(t["token"] for t in content) == scored["message"]["content"] == example.answer
        assert all(len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["logprob"] >= t["logprob"] - 1e-6
                   and t["bytes"] == list(t["token"].encode()) for t in content)
        chunks = _stream(base, "/v1/chat/completions", messages=messages, logprobs=True, **settings)
        assert [t["token"] for e in chunks for c in e["choices"] for t in (c.get("logprobs") or {}).get("content", [])] \
            == [t["token"] for t in content]
        refused = _chat(base, messages=[{"role": "system", "content": "hi"}], **settings)
        assert refused.status_code == 400
        assert "the chat template refused them: a conversation needs a user message" in refused.json()["error"]["message"]


def _stream(base, path="/v1/completions", **body) -> list[dict]:
    """The events of a streamed request, `[DONE]` checked and dropped."""
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


@pytest.mark.slow
def test_streamed_chunks_concatenate_to_the_non_streamed_text(server):
    base, _ = server
    body = dict(prompt=["abc", "hello world"], max_tokens=8, steps=8, block_length=4)
    expected = [c["text"] for c in _complete(base, **body).json()["choices"]]
    events = _stream(base, **body)
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    texts, reasons, pieces = ["", ""], [None, None], 0
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
            pieces += bool(choice["text"])
            reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert texts == expected and reasons == ["length", "length"]
    assert pieces > 2  # the text arrived in pieces as it was committed, not at the end
    # stream_canvas: every step's canvas, committed positions kept and masked ones filling in.
    canvases = [c["canvas"] for e in _stream(base, **body, stream_canvas=True) for c in e["choices"]
                if c["index"] == 0 and "canvas" in c]
    assert len(canvases) == 8 and all(len(c) == 8 for c in canvases) and None not in canvases[-1]
    masked = [sum(t is None for t in c) for c in canvases]
    assert masked == sorted(masked, reverse=True) and masked[0] == 7  # one token committed per step
    stopped = _stream(base, prompt="abc", max_tokens=8, steps=8, block_length=4, stop=expected[0][2:3])
    text = "".join(c["text"] for e in stopped for c in e["choices"])
    assert text == expected[0][:expected[0].index(expected[0][2])]
    assert stopped[-1]["choices"][-1]["finish_reason"] == "stop"


@pytest.mark.slow
def test_a_client_that_goes_away_cancels_its_decoding(server):
    base, _ = server
    before = httpx.get(f"{base}/health").json()["batches_cancelled"]
    body = dict(prompt="abc", max_tokens=200, steps=200, block_length=200, seed=11, stream=True)
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["choices"]
    deadline = time.time() + 60
    while httpx.get(f"{base}/health").json()["batches_cancelled"] == before:  # stopped after the disconnect
        assert time.time() < deadline, "the decoding went on after its client disconnected"
        time.sleep(0.2)
    assert httpx.get(f"{base}/health").json()["pending_prompts"] == 0
    assert _complete(base, prompt="abc", max_tokens=2).status_code == 200


def test_logprob_tokens_are_what_each_token_adds_to_the_text():
    """With a byte-level BPE tokenizer a character can span tokens, and a token decoded alone is not
    what it adds to the text: the entries' strings concatenate to the decoded text exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from starquant_plugin.serving.engine import _TextTokens

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["hello world"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<mask>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", mask_token="<mask>")
    mask = tokenizer.mask_token_id
    text = "héllo wörld 日本 🙂"
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # some token holds part of a character
    n = len(ids)
    texts = _TextTokens(tokenizer, mask)
    half = ids[:n // 2] + [mask] * (n - n // 2)  # a stream's update: the committed prefix so far
    first = texts.extend(0, half, [-0.5] * n, [[0]] * n, [[-0.1]] * n)
    entries = texts.extend(0, ids, [-0.5] * n, [[0]] * n, [[-0.1]] * n)
    assert entries[:len(first)] == first and len(entries) == n - 1  # the EOS is not part of the text
    assert "".join(e.token for e in entries) == tokenizer.decode(ids, skip_special_tokens=True) == text
