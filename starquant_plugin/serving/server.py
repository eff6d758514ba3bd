"""OpenAI-compatible HTTP server for diffusion decoding: `starquant serve CKPT --port N`.

Endpoints: `POST /v1/completions`, `GET /v1/models`, `GET /health`. Diffusion settings are
extra request fields (`steps`, `block_length`, `remasking`, `cfg_scale`, `threshold`);
`max_tokens` is the generation length. Concurrent requests with the same settings are
decoded together in one batch; a bad request is answered 400 with a message naming the
field, and when more prompts are waiting than `max_pending` the server answers 503 instead
of queueing without bound. Errors use OpenAI's `{"error": {...}}` shape.
"""

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..checkpoint.config import describe_validation_error
from ..diffusion import DiffusionSamplingConfig

__all__ = ["CompletionRequest", "DiffusionBatcher", "Overloaded", "build_app", "serve"]


class CompletionRequest(BaseModel):
    """`/v1/completions` body: OpenAI's fields that apply, plus the diffusion settings."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, gt=0, description="tokens to generate (gen_length)")
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    n: Literal[1] = 1
    stream: Literal[False] = False
    user: str | None = None
    # Diffusion decoding (LLaDA's names); defaults as in `DiffusionSamplingConfig`.
    steps: int | None = Field(None, gt=0)
    block_length: int | None = Field(None, gt=0)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    cfg_scale: float = Field(0.0, ge=0)
    threshold: float | None = None

    def sampling(self) -> DiffusionSamplingConfig:
        """The decoding settings; ValueError naming the field when they do not fit together."""
        return DiffusionSamplingConfig(
            gen_length=self.max_tokens, steps=self.steps, block_length=self.block_length,
            temperature=self.temperature, remasking=self.remasking, cfg_scale=self.cfg_scale,
            threshold=self.threshold, seed=self.seed,
        )

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise ValueError("prompt: at least one prompt is required")
        return prompts


class Overloaded(Exception):
    """More prompts are waiting than the server accepts."""


@dataclass
class _Pending:
    prompts: list[str]
    sampling: DiffusionSamplingConfig
    future: asyncio.Future = field(repr=False)


class DiffusionBatcher:
    """Decodes waiting requests in batches: one engine call at a time, and each call takes
    every waiting request whose settings equal the oldest one's, up to `max_batch_size` prompts.

    Args:
        generate: `(prompts, sampling) -> completions`, blocking (run in a worker thread).
        max_batch_size: prompts per engine call.
        max_pending: prompts allowed to wait; beyond it `submit` raises `Overloaded`.
    """

    def __init__(self, generate, max_batch_size: int = 64, max_pending: int = 256):
        self.generate = generate
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.waiting: list[_Pending] = []
        self.batches_run = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def pending_prompts(self) -> int:
        return sum(len(p.prompts) for p in self.waiting)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def submit(self, prompts: list[str], sampling: DiffusionSamplingConfig) -> list:
        if self.pending_prompts + len(prompts) > self.max_pending:
            raise Overloaded(f"{self.pending_prompts} prompts are waiting (max_pending={self.max_pending})")
        pending = _Pending(prompts, sampling, asyncio.get_running_loop().create_future())
        self.waiting.append(pending)
        self._wakeup.set()
        return await pending.future

    def _take_batch(self) -> list[_Pending]:
        first = self.waiting[0]
        batch, size = [], 0
        for pending in list(self.waiting):
            if pending.sampling == first.sampling and (not batch or size + len(pending.prompts) <= self.max_batch_size):
                batch.append(pending)
                size += len(pending.prompts)
                self.waiting.remove(pending)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.waiting:
                batch = self._take_batch()
                prompts = [p for pending in batch for p in pending.prompts]
                try:
                    completions = await loop.run_in_executor(None, self.generate, prompts, batch[0].sampling)
                except Exception as error:  # one failed batch must not stop the server
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(error)
                    continue
                finally:
                    self.batches_run += 1
                start = 0
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_result(completions[start:start + len(pending.prompts)])
                    start += len(pending.prompts)


def _error(status: int, message: str, kind: str):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def build_app(llm, served_model_name: str, max_batch_size: int = 64, max_pending: int = 256):
    """The FastAPI app around a `DiffusionLLM` (or anything with `generate`, `tokenizer`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request

    batcher = DiffusionBatcher(llm.generate, max_batch_size, max_pending)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="starquant diffusion server", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending_prompts": batcher.pending_prompts, "batches_run": batcher.batches_run}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "owned_by": "starquant"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        try:
            parsed = CompletionRequest.model_validate(body)
            prompts, sampling = parsed.prompts(), parsed.sampling()
            llm.validate(prompts, sampling)  # per request, so one bad prompt cannot fail a shared batch
        except ValidationError as error:
            return _error(400, describe_validation_error(error), "invalid_request_error")
        except ValueError as error:
            return _error(400, str(error), "invalid_request_error")
        if parsed.model is not None and parsed.model != served_model_name:
            return _error(404, f"model {parsed.model!r} is not served here (serving {served_model_name!r})",
                          "invalid_request_error")
        try:
            results = await batcher.submit(prompts, sampling)
        except Overloaded as error:
            return _error(503, f"server overloaded, retry later: {error}", "overloaded_error")
        except ValueError as error:  # e.g. prompt + max_tokens longer than the model's canvas
            return _error(400, str(error), "invalid_request_error")
        except Exception as error:
            logger.exception("decoding failed")
            return _error(500, f"decoding failed: {type(error).__name__}: {error}", "internal_error")
        prompt_tokens = sum(len(llm.tokenizer(p)["input_ids"]) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for c in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served_model_name,
            "choices": [
                {"index": i, "text": c.text, "finish_reason": "length", "logprobs": None}
                for i, c in enumerate(results)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return app


def serve(
    model_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    max_batch_size: int = 64,
    max_pending: int = 256,
) -> None:
    """Load `model_dir` on a vLLM engine and serve it until interrupted."""
    import uvicorn

    from .engine import DiffusionLLM

    llm = DiffusionLLM(model_dir, tensor_parallel_size=tensor_parallel_size, dtype=dtype, max_batch_size=max_batch_size)
    name = served_model_name or str(model_dir).rstrip("/").split("/")[-1]
    app = build_app(llm, name, max_batch_size, max_pending)
    logger.info(f"serving {model_dir} as {name!r} on http://{host}:{port}")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        llm.close()
