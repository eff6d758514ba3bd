"""OpenAI-compatible HTTP server for diffusion decoding: `starquant serve CKPT --port N`.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (`messages` rendered by the
checkpoint's chat template), `GET /v1/models`, `GET /health`. Diffusion settings are
extra request fields (`steps`, `block_length`, `remasking`, `cfg_scale`, `threshold`);
`max_tokens` is the generation length. Concurrent requests with the same settings are
decoded together in one batch; a bad request is answered 400 with a message naming the
field, and when more prompts are waiting than `max_pending` the server answers 503 instead
of queueing without bound. Errors use OpenAI's `{"error": {...}}` shape.

No request can stall or crash the server: bodies over `max_body_bytes` are refused (413)
before they are read in full; parsing, validation and tokenizing run in worker threads, so
the event loop (and `/health`) keeps answering; every number is bounded (the canvas, the
seed's range, finite floats) and strictly typed; a prompt the model cannot read as written
(a character outside the vocabulary, a lone surrogate, the mask token) is a 400 naming it.
"""

import asyncio
import copy
import dataclasses
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..diffusion import DiffusionSamplingConfig
from ..diffusion.sampler import MAX_LOGPROBS, Remasking
from ..errors import InputError
from ..evaluation.runner import encode_prompt
from .engine import DiffusionSamplingParams

__all__ = [
    "DEFAULT_MAX_BODY_BYTES", "ChatCompletionRequest", "CompletionRequest", "DiffusionBatcher", "Overloaded", "build_app",
    "render_chat", "serve",
]

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 256 prompts of 4 KiB; tokenizing it takes ~2 s on one core
MAX_SEED = 2**63 - 1  # a signed 64-bit integer, as OpenAI's `seed`; `torch.Generator.manual_seed` takes it


class _DecodingRequest(BaseModel):
    """The fields `/v1/completions` and `/v1/chat/completions` share: OpenAI's that apply, plus
    the diffusion settings.

    Strict types (a boolean is not a number, a string is not an integer; an integer is a
    fine float) and finite floats; the bounds that depend on the model are `check_limits`'.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, gt=0, description="tokens to generate (gen_length); default: the "
                                   "model's generation_config.json max_new_tokens, else 16")
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, description="independent samples per prompt, seeds seed, seed + 1, ...")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text is cut before the first")
    stream: bool = False
    stream_canvas: bool = Field(False, description="with stream: every step's canvas (tokens, null where masked)")
    user: str | None = None
    # Diffusion decoding (LLaDA's names); defaults as in `DiffusionSamplingConfig`.
    steps: int | None = Field(None, gt=0)
    block_length: int | None = Field(None, gt=0)
    remasking: Remasking = "low_confidence"
    cfg_scale: float = Field(0.0, ge=0, allow_inf_nan=False)
    threshold: float | None = Field(None, allow_inf_nan=False)
    cache: Literal["none", "prefix", "dual"] = Field("none", description="approximate key/value cache of block-wise "
                                                     "decoding (docs/serving.md)")
    cache_refresh_steps: int | None = Field(None, gt=0, description="with cache: refresh it every N steps of a block")

    @field_validator("n", "stream", "stream_canvas", mode="before")
    @classmethod
    def _literal_of_its_own_type(cls, value, info):
        # A literal compares equal across bool and int (True == 1, 0 == False) even in strict mode.
        if info.field_name in ("stream", "stream_canvas") and not isinstance(value, bool):
            raise ValueError(f"must be a boolean, got {type(value).__name__}")
        if info.field_name == "n" and isinstance(value, bool):
            raise ValueError("must be an integer, got bool")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        strings = [value] if isinstance(value, str) else value or []
        if len(strings) > 4 or any(not s for s in strings):
            raise ValueError("at most 4 non-empty strings")
        return value

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_limits(self, max_sequence_length: int) -> None:
        """InputError naming the field when a length or step count exceeds the model's canvas, or
        the seeds of `n` samples leave the seed's range."""
        if self.seed + self.n - 1 > MAX_SEED:
            raise InputError(f"seed: {self.seed} + n - 1 exceeds {MAX_SEED} (sample i uses seed + i)")
        if self.stream and self.n > 1:
            raise InputError("n: a streamed request decodes one sample per prompt (n = 1)")
        if self.stream_canvas and not self.stream:
            raise InputError("stream_canvas: needs stream: true")
        for name in ("max_tokens", "steps", "block_length"):
            value = getattr(self, name)
            if value is not None and value > max_sequence_length:
                raise InputError(
                    f"{name}: {value} exceeds the model's max_sequence_length={max_sequence_length} "
                    "(the canvas holds the prompt and the generation)"
                )

    def logprobs_count(self) -> int | None:
        """Most likely alternatives to report per token; None: no log-probabilities."""
        return None

    def sampling(self) -> DiffusionSamplingParams:
        """The decoding settings; ValueError naming the field when they do not fit together."""
        return DiffusionSamplingParams(
            gen_length=self.max_tokens, steps=self.steps, block_length=self.block_length,
            temperature=self.temperature, remasking=self.remasking, cfg_scale=self.cfg_scale,
            threshold=self.threshold, seed=self.seed, top_k=self.top_k, top_p=self.top_p,
            logprobs=self.logprobs_count(), cache=self.cache, cache_refresh_steps=self.cache_refresh_steps,
        )


class CompletionRequest(_DecodingRequest):
    """`/v1/completions` body."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="log-probability of each token of the "
                                 "text and of its position's `logprobs` most likely tokens")

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise InputError("prompt: at least one prompt is required")
        return prompts

    def prompt_names(self) -> list[str]:
        """How messages name each prompt: `prompt`, or `prompt[i]` in a list."""
        return ["prompt"] if isinstance(self.prompt, str) else [f"prompt[{i}]" for i in range(len(self.prompt))]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_DecodingRequest):
    """`/v1/chat/completions` body: `messages` rendered with the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = Field(False, description="log-probability of each token of the message")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: that many most "
                                     "likely tokens of each position")

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def render_chat(tokenizer, messages: list[ChatMessage]) -> str:
    """The prompt text of a conversation by the tokenizer's `chat_template` (with the generation
    prompt); InputError when the model has none or the template refuses the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("messages: this model has no chat template (tokenizer_config.json has no chat_template); "
                         "use /v1/completions")
    try:
        return tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as error:  # the template's own raise_exception, or a rendering error
        raise InputError(f"messages: the chat template refused them: {error}") from None


class Overloaded(Exception):
    """More prompts are waiting than the server accepts (it can drain: retry later)."""


class _BatchCancelled(Exception):
    """Every client of a streaming batch went away: its decoding stopped."""


@dataclass
class _Pending:
    prompts: list[str]
    sampling: DiffusionSamplingConfig
    future: asyncio.Future = field(repr=False)
    add_special_tokens: bool = True  # False for chat prompts: the template wrote them
    # Streaming: called on the event loop with this request's rows of each `DiffusionProgress`.
    listener: object = field(default=None, repr=False)
    cancelled: bool = False  # the client went away: its batch stops once no one else waits on it


class DiffusionBatcher:
    """Decodes waiting requests in batches: one engine call at a time, and each call takes
    every waiting request whose settings equal the oldest one's, up to `max_batch_size` prompts.

    A batch with a streaming request (a `listener`) decodes with `generate_stream`, and every
    progress update reaches the listeners; a batch whose requests were all cancelled stops.

    Args:
        generate: `(prompts, sampling, add_special_tokens=) -> completions`, blocking (run in a worker thread).
        max_batch_size: prompts per engine call.
        max_pending: prompts allowed to wait; beyond it `submit` raises `Overloaded`.
        generate_stream: `(prompts, sampling, add_special_tokens=) -> iterator of DiffusionProgress`
            (the last with `completions`), for streaming requests.
    """

    def __init__(self, generate, max_batch_size: int = 64, max_pending: int = 256, generate_stream=None):
        self.generate = generate
        self.generate_stream = generate_stream
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.waiting: list[_Pending] = []
        self.batches_run = 0
        self.batches_cancelled = 0  # streaming batches stopped because every client went away
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

    def enqueue(self, prompts: list[str], sampling: DiffusionSamplingConfig, add_special_tokens: bool = True,
                listener=None) -> _Pending:
        """Queue a request; its `future` gets the completions. InputError / Overloaded when it cannot wait."""
        if len(prompts) > self.max_pending:  # would never fit, however empty the queue: not "retry later"
            raise InputError(
                f"prompt: {len(prompts)} prompts in one request exceed max_pending={self.max_pending}, "
                "the most this server queues; split the request"
            )
        if self.pending_prompts + len(prompts) > self.max_pending:
            raise Overloaded(f"{self.pending_prompts} prompts are waiting (max_pending={self.max_pending})")
        pending = _Pending(prompts, sampling, asyncio.get_running_loop().create_future(), add_special_tokens, listener)
        self.waiting.append(pending)
        self._wakeup.set()
        return pending

    async def submit(self, prompts: list[str], sampling: DiffusionSamplingConfig, add_special_tokens: bool = True) -> list:
        return await self.enqueue(prompts, sampling, add_special_tokens).future

    def _take_batch(self) -> list[_Pending]:
        for gone in [p for p in self.waiting if p.cancelled]:  # streamed requests whose client left while waiting
            self.waiting.remove(gone)
            gone.future.cancel()
        if not self.waiting:
            return []
        first = self.waiting[0]
        batch, size = [], 0
        for pending in list(self.waiting):
            same = (pending.sampling, pending.add_special_tokens) == (first.sampling, first.add_special_tokens)
            if same and (not batch or size + len(pending.prompts) <= self.max_batch_size):
                batch.append(pending)
                size += len(pending.prompts)
                self.waiting.remove(pending)
        return batch

    def _decode(self, batch: list[_Pending], loop) -> list:
        """The batch's completions, in its prompts' order (blocking: runs in a worker thread)."""
        prompts = [p for pending in batch for p in pending.prompts]
        first = batch[0]
        if not any(pending.listener for pending in batch) or self.generate_stream is None:
            return self.generate(prompts, first.sampling, add_special_tokens=first.add_special_tokens)
        updates = self.generate_stream(prompts, first.sampling, add_special_tokens=first.add_special_tokens)
        try:
            for progress in updates:
                start = 0
                for pending in batch:
                    if pending.listener is not None and not pending.cancelled:
                        rows = slice(start, start + len(pending.prompts))
                        loop.call_soon_threadsafe(pending.listener, progress, rows)
                    start += len(pending.prompts)
                if progress.completions is not None:
                    return progress.completions
                if all(pending.cancelled for pending in batch):
                    raise _BatchCancelled("every request of the batch was cancelled")
        finally:
            updates.close()  # stops the workers' decoding when it did not finish
        raise RuntimeError("the decoding stream ended without completions")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.waiting:
                batch = self._take_batch()
                if not batch:
                    break
                try:
                    completions = await loop.run_in_executor(None, self._decode, batch, loop)
                except Exception as error:  # one failed (or cancelled) batch must not stop the server
                    self.batches_cancelled += isinstance(error, _BatchCancelled)
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


def _apply_stop(text: str, stop: list[str]) -> tuple[str, str]:
    """The text cut before the first occurrence of any stop string, and OpenAI's finish_reason
    (`stop` when cut; `length` otherwise: a diffusion canvas has a fixed length)."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[:min(cuts)], "stop") if cuts else (text, "length")


def _within(entries: list, length: int) -> list:
    """The token entries (`TokenLogprob`) whose text starts within the first `length` characters
    (the text a stop string cut)."""
    kept, at = [], 0
    for entry in entries:
        if at >= length:
            break
        kept.append(entry)
        at += len(entry.token)
    return kept


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # as vLLM: JSON has no -inf (a token the model rules out)


def _logprobs_json(entries: list, chat: bool, offset: int = 0) -> dict:
    """OpenAI's `logprobs` of a choice (or chunk) from `TokenLogprob` entries: chat's `{"content":
    [{"token", "logprob", "bytes", "top_logprobs"}]}`, or the completions API's `tokens`,
    `token_logprobs`, `top_logprobs` (the position's most likely tokens and the chosen one) and
    `text_offset` (from `offset`)."""
    if chat:
        return {"content": [{
            "token": e.token, "logprob": _finite(e.logprob), "bytes": list(e.token.encode("utf-8", "replace")),
            "top_logprobs": [{"token": t, "logprob": _finite(v), "bytes": list(t.encode("utf-8", "replace"))}
                             for t, v in e.top]} for e in entries]}
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [{**{t: _finite(v) for t, v in e.top}, e.token: _finite(e.logprob)} for e in entries],
            "text_offset": offsets}


def _error(status: int, message: str, kind: str):
    from fastapi.responses import JSONResponse

    # A message may quote the request (a field name, a value) and so a lone surrogate, which
    # the UTF-8 response body cannot hold: escape it rather than fail with a 500.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def _describe(error: ValidationError) -> str:
    """`field.path: message` of the first problem pydantic found (`request body` for the body itself)."""
    first = error.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc']) or 'request body'}: {first['msg']}"


class _BodyRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def _read_body(request, max_body_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `max_body_bytes`: by its
    Content-Length before anything is read, or by the bytes streamed so far (chunked uploads)."""
    too_large = f"request body exceeds the limit of {max_body_bytes} bytes (max_body_bytes)"
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise _BodyRefused(400, f"Content-Length is not a byte count: {declared!r}") from None
        if declared_bytes > max_body_bytes:
            raise _BodyRefused(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise _BodyRefused(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(llm, served_model_name: str, max_batch_size: int = 64, max_pending: int = 256,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, default_max_tokens: int = 16, on_shutdown=None):
    """The FastAPI app around a `DiffusionLLM` (or anything with `generate`, `tokenizer`,
    `mask_token_id` and `max_sequence_length`); `default_max_tokens` for requests without
    `max_tokens` (`serve` takes the model's generation_config.json `max_new_tokens`); `on_shutdown`
    runs when the server stops (`serve`: the engine's processes are stopped there, since uvicorn
    ends the process with the signal it caught once the app has shut down)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    batcher = DiffusionBatcher(llm.generate, max_batch_size, max_pending, getattr(llm, "generate_stream", None))
    max_sequence_length, mask_token_id = llm.max_sequence_length, llm.mask_token_id
    # Validation gets its own tokenizer: the engine's pads batches in the decoding thread, and a
    # fast tokenizer whose padding is switched while another thread encodes fails ("Already borrowed").
    tokenizer, tokenizer_lock = copy.deepcopy(llm.tokenizer), threading.Lock()

    def parse(raw: bytes, chat: bool) -> tuple[_DecodingRequest, list[str], DiffusionSamplingConfig, int]:
        """(request, prompts, decoding settings, prompt tokens) of a body (`chat`: of
        /v1/chat/completions, its one prompt rendered by the chat template); InputError or
        ValidationError naming the field. Blocking: run in a worker thread."""
        try:
            body = json.loads(raw)
        except RecursionError:
            raise InputError("request body: JSON nested too deeply") from None
        except ValueError:
            raise InputError("request body is not valid JSON") from None
        parsed = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        if parsed.max_tokens is None:
            parsed.max_tokens = default_max_tokens
        if chat:
            with tokenizer_lock:
                prompts, names = [render_chat(tokenizer, parsed.messages)], ["messages"]
        else:
            prompts, names = parsed.prompts(), parsed.prompt_names()
        if len(prompts) * parsed.n > max_pending:  # before tokenizing any of them
            raise InputError(
                f"prompt: {len(prompts)} prompts{f' x n={parsed.n} samples' if parsed.n > 1 else ''} in one request "
                f"exceed max_pending={max_pending}, "
                "the most this server queues; split the request"
            )
        parsed.check_limits(max_sequence_length)
        sampling = parsed.sampling()
        prompt_tokens = 0
        for prompt, name in zip(prompts, names):
            with tokenizer_lock:
                # A chat template writes the special tokens it wants (BOS) itself.
                length = len(encode_prompt(tokenizer, prompt, mask_token_id, name, add_special_tokens=not chat))
            # Per request (as `DiffusionLLM.validate`), so one bad prompt cannot fail a shared batch.
            if length == 0:
                raise InputError(f"{name}: empty (the tokenizer produced no tokens)")
            if length + sampling.gen_length > max_sequence_length:
                raise InputError(
                    f"{name}: {length} prompt tokens + max_tokens {sampling.gen_length} exceeds "
                    f"max_sequence_length={max_sequence_length}"
                )
            prompt_tokens += length
        return parsed, prompts, sampling, prompt_tokens

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="starquant diffusion server", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending_prompts": batcher.pending_prompts, "batches_run": batcher.batches_run,
                "batches_cancelled": batcher.batches_cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "owned_by": "starquant"}]}

    async def decode(request: Request, chat: bool):
        try:
            raw = await _read_body(request, max_body_bytes)
        except _BodyRefused as error:
            return _error(error.status, str(error), "invalid_request_error")
        try:
            parsed, prompts, sampling, prompt_tokens = await run_in_threadpool(parse, raw, chat)
        except ValidationError as error:
            return _error(400, _describe(error), "invalid_request_error")
        except ValueError as error:
            return _error(400, str(error), "invalid_request_error")
        except RecursionError:  # parse() maps the JSON decoder's; this is for anything deeper down
            return _error(400, "request body: nested too deeply", "invalid_request_error")
        if parsed.model is not None and parsed.model != served_model_name:
            return _error(404, f"model {parsed.model!r} is not served here (serving {served_model_name!r})",
                          "invalid_request_error")
        if parsed.stream:
            queue: asyncio.Queue = asyncio.Queue()
            try:
                pending = batcher.enqueue(prompts, sampling, not chat, listener=lambda *update: queue.put_nowait(update))
            except Overloaded as error:
                return _error(503, f"server overloaded, retry later: {error}", "overloaded_error")
            except ValueError as error:
                return _error(400, str(error), "invalid_request_error")
            return StreamingResponse(_events(parsed, chat, pending, queue), media_type="text/event-stream")
        try:
            # Sample i of every prompt decodes with seed + i (its own batch: settings differ).
            samples = await asyncio.gather(*(
                batcher.submit(prompts, dataclasses.replace(sampling, seed=sampling.seed + i), add_special_tokens=not chat)
                for i in range(parsed.n)
            ))
        except Overloaded as error:
            return _error(503, f"server overloaded, retry later: {error}", "overloaded_error")
        except ValueError as error:  # e.g. the engine's own checks
            return _error(400, str(error), "invalid_request_error")
        except Exception as error:
            logger.exception("decoding failed")
            return _error(500, f"decoding failed: {type(error).__name__}: {error}", "internal_error")
        results = [sample[j] for j in range(len(prompts)) for sample in samples]  # prompt-major, as OpenAI
        completion_tokens = sum(len(c.token_ids) for c in results)
        choices = []
        for i, completion in enumerate(results):
            text, finish_reason = _apply_stop(completion.text, parsed.stop_strings())
            logprobs = None if completion.logprobs is None else _logprobs_json(_within(completion.logprobs, len(text)), chat)
            choice = {"index": i, "finish_reason": finish_reason, "logprobs": logprobs}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": served_model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _events(parsed: _DecodingRequest, chat: bool, pending: _Pending, queue: asyncio.Queue):
        """Server-sent events of a streamed request (OpenAI's chunks): each carries the text committed
        since the last one, in order (the generation's prefix up to its first masked position);
        `stream_canvas` adds each step's canvas. Ends with the finish reasons and `data: [DONE]`.
        A client that goes away cancels its request (and its batch once no one else waits on it)."""
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        stops, count = parsed.stop_strings(), len(pending.prompts)
        sent, finished = [""] * count, [False] * count
        sent_tokens, sent_offset = [0] * count, [0] * count  # logprobs: entries and characters sent

        def event(choices: list[dict]) -> str:
            return "data: " + json.dumps({
                "id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": served_model_name, "choices": choices}) + "\n\n"

        def choice(index: int, text: str, finish_reason: str | None, canvas=None, entries=None) -> dict:
            item = {"index": index, "finish_reason": finish_reason}
            item.update({"delta": {"content": text}} if chat else {"text": text})
            logprobs = None
            if entries is not None:
                new = _within(entries, len(sent[index]))[sent_tokens[index]:]
                logprobs = _logprobs_json(new, chat, sent_offset[index])
                sent_tokens[index] += len(new)
                sent_offset[index] += sum(len(e.token) for e in new)
            if not chat or logprobs is not None:
                item["logprobs"] = logprobs
            if canvas is not None:
                item["canvas"] = canvas
            return item

        def advance(index: int, text: str) -> tuple[str, str | None]:
            """The new text of choice `index` (cut at a stop string) and its finish reason."""
            text, reason = _apply_stop(text, stops)
            if not text.startswith(sent[index]):
                return "", reason if reason == "stop" else None  # never retract what was sent
            delta, sent[index] = text[len(sent[index]):], text
            return delta, reason if reason == "stop" else None

        try:
            if chat:
                yield event([{"index": i, "delta": {"role": "assistant"}, "finish_reason": None} for i in range(count)])
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, pending.future}, return_when=asyncio.FIRST_COMPLETED)
                updates = [getter.result()] if getter.done() else []
                getter.cancel()
                while not queue.empty():
                    updates.append(queue.get_nowait())
                for progress, rows in updates:
                    choices = []
                    for i, row in enumerate(range(rows.start, rows.stop)):
                        if finished[i]:
                            continue
                        delta, reason = advance(i, progress.committed_texts[row])
                        finished[i] = reason == "stop"
                        canvas = progress.canvases[row] if parsed.stream_canvas else None
                        entries = None if progress.logprobs is None else progress.logprobs[row]
                        if delta or reason or canvas is not None:
                            choices.append(choice(i, delta, reason, canvas, entries))
                    if choices:
                        yield event(choices)
                if all(finished):
                    break  # every choice hit a stop string: its decoding is not needed any more
                if pending.future.done():
                    error = pending.future.exception()
                    if error is not None:
                        yield "data: " + json.dumps({"error": {"message": f"decoding failed: {error}",
                                                               "type": "internal_error", "code": 500}}) + "\n\n"
                        break
                    choices = []
                    for i, completion in enumerate(pending.future.result()):
                        if not finished[i]:
                            delta, reason = advance(i, completion.text)
                            choices.append(choice(i, delta, reason or "length", entries=completion.logprobs))
                    if choices:
                        yield event(choices)
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not pending.future.done():
                pending.cancelled = True

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await decode(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await decode(request, chat=True)

    return app


def default_max_tokens(model_dir) -> int:
    """`max_new_tokens` of the checkpoint's generation_config.json (a positive integer), else 16."""
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    try:
        value = json.loads(path.read_text()).get("max_new_tokens") if path.is_file() else None
    except (ValueError, AttributeError):
        raise InputError(f"{path}: not a JSON object") from None
    if value is None:
        return 16
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{path}: max_new_tokens must be a positive integer, got {value!r}")
    return value


def serve(
    model_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    max_batch_size: int = 64,
    max_pending: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Load `model_dir` on a vLLM engine and serve it until interrupted."""
    import uvicorn

    from .engine import DiffusionLLM

    max_tokens = default_max_tokens(model_dir)  # a bad generation_config.json is refused before the engine starts
    llm = DiffusionLLM(model_dir, tensor_parallel_size=tensor_parallel_size, dtype=dtype, max_batch_size=max_batch_size)
    name = served_model_name or str(model_dir).rstrip("/").split("/")[-1]
    app = build_app(llm, name, max_batch_size, max_pending, max_body_bytes, max_tokens, on_shutdown=llm.close)
    logger.info(f"serving {model_dir} as {name!r} on http://{host}:{port}")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        llm.close()
