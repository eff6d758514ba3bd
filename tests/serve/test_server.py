"""`starquant serve`: OpenAI-compatible completions over a real vLLM engine, on loopback.

The batching policy is unit-tested on `DiffusionBatcher` with a slow stand-in generator;
everything else talks HTTP to a real `starquant serve` subprocess.
"""

import asyncio
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from starquant_plugin.diffusion import DiffusionSamplingConfig
from starquant_plugin.evaluation import core_generate_fn
from starquant_plugin.models import load_llada
from starquant_plugin.serving.server import DiffusionBatcher, Overloaded
from tests.conftest import random_hub_tensors, tiny_config, write_hub_checkpoint

httpx = pytest.importorskip("httpx")
pytest.importorskip("vllm", reason="the serve environment (.venv/serve) runs these")


@dataclass
class _Completion:
    text: str
    token_ids: list


def test_batcher_groups_equal_settings_and_refuses_overload():
    calls = []

    def slow_generate(prompts, sampling):
        calls.append((list(prompts), sampling.seed))
        time.sleep(0.2)
        return [_Completion(p.upper(), []) for p in prompts]

    async def scenario():
        batcher = DiffusionBatcher(slow_generate, max_batch_size=3, max_pending=4)
        batcher.start()
        greedy, other = DiffusionSamplingConfig(gen_length=2), DiffusionSamplingConfig(gen_length=2, seed=9)
        first = asyncio.ensure_future(batcher.submit(["a"], greedy))
        await asyncio.sleep(0.05)  # "a" is decoding; the next ones wait together
        rest = [asyncio.ensure_future(batcher.submit([p], s)) for p, s in (("b", greedy), ("c", other), ("d", greedy))]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(["e", "f"], greedy)  # 3 waiting + 2 > max_pending
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert [[c.text for c in r] for r in results] == [["A"], ["B"], ["C"], ["D"]]
    # b and d share settings and ride one call; c runs on its own.
    assert calls == [(["a"], 0), (["b", "d"], 0), (["c"], 9)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = tiny_config(n_kv_heads=2)
    directory = write_hub_checkpoint(tmp_path_factory.mktemp("server") / "tiny", config, random_hub_tensors(config, seed=7))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "starquant_plugin.cli", "serve", str(directory), "--port", str(port),
         "--served-model-name", "tiny", "--max-pending", "4"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("server did not become healthy in 240 s")
    yield base, directory
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def _complete(base, **body):
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


@pytest.mark.slow
def test_completions_match_core_under_a_concurrent_burst(server):
    base, directory = server
    models = httpx.get(f"{base}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    prompts = ["abc", "hello world", "q", "12+34="]
    model, tokenizer = load_llada(directory)
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
        ({"prompt": "abc", "max_tokens": 4, "stream": True}, 400, "stream"),
        ({"prompt": "abc", "max_tokens": 4, "remasking": "sometimes"}, 400, "remasking"),
        ({"prompt": "abc", "max_tokens": 4, "threshold": 2.0}, 400, "threshold"),
        ({"prompt": "abc", "max_tokens": 1000}, 400, "max_sequence_length"),
        ({"prompt": [], "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "abc", "model": "other"}, 404, "not served"),
    ],
)
def test_malformed_requests_are_answered_and_the_server_keeps_going(server, body, status, message):
    base, _ = server
    response = _complete(base, **body)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    assert _complete(base, prompt="abc", max_tokens=2).status_code == 200


@pytest.mark.slow
def test_non_json_body_is_400(server):
    base, _ = server
    response = httpx.post(f"{base}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


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
