"""`DiffusionLLM`: masked-diffusion decoding on a vLLM engine.

vLLM loads the checkpoint (its loader, quantization and tensor parallelism); the denoising
loop runs inside vLLM's workers (`serving.worker`), one RPC per batch of prompts.

    from starquant_plugin.serving import DiffusionLLM, DiffusionSamplingParams
    llm = DiffusionLLM("path/to/checkpoint")
    outputs = llm.generate(["417+385="], DiffusionSamplingParams(gen_length=4))
    print(outputs[0].text)
"""

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import validate_checkpoint
from ..diffusion import DiffusionSamplingConfig
from .hardware import hardware_precisions, serving_dtype
from .kv_cache import CACHE_MODES
from .servable import check_servable

__all__ = ["DiffusionLLM", "DiffusionSamplingParams", "DiffusionCompletion", "DiffusionProgress", "TokenLogprob"]

WORKER_EXTENSION = "starquant_plugin.serving.worker.DiffusionWorkerExtension"


@dataclass
class DiffusionSamplingParams(DiffusionSamplingConfig):
    """Decoding settings of one `generate` call: the core sampler's (`DiffusionSamplingConfig`), and
    the engine's approximate key/value cache (`serving.kv_cache`):

    Args:
        cache: `none`, `prefix` (keys/values left of the current block kept from the block's
            first step) or `dual` (left and right of it).
        cache_refresh_steps: also refresh the cache every N steps inside a block (None: at each
            block's first step only; 1: every step, decoding exactly as without cache).
    """

    cache: str = "none"
    cache_refresh_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}")
        refresh = self.cache_refresh_steps
        if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, int) or refresh <= 0):
            raise ValueError(f"cache_refresh_steps must be a positive integer, got {refresh!r}")
        if refresh is not None and self.cache == "none":
            raise ValueError("cache_refresh_steps needs cache: prefix or dual")


@dataclass
class TokenLogprob:
    """One generated token of the text: its string (the token decoded alone), id, log-probability
    (`DiffusionSamplingConfig.logprobs`) and its position's most likely tokens (string, log-probability),
    best first."""

    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class DiffusionProgress:
    """One streamed update of a batch: `steps` so far; per prompt the text of the committed prefix
    (the generation's tokens up to its first still-masked position, decoded) and the canvas of the
    generation (each position's token, None where still masked); with `logprobs` requested, per
    prompt those of the committed prefix's text tokens; `completions` once done."""

    steps: int
    committed_texts: list[str]
    canvases: list[list[str | None]]
    completions: list["DiffusionCompletion"] | None = None
    logprobs: list[list[TokenLogprob]] | None = None


@dataclass
class DiffusionCompletion:
    """One prompt's continuation; `steps` = denoising steps of the batch it was decoded in;
    `logprobs` (when requested) one entry per token of `text` (special tokens are not part of it)."""

    prompt: str
    text: str
    token_ids: list[int]
    steps: int
    logprobs: list[TokenLogprob] | None = None


class _TextTokens:
    """Each generated text token's string as the text shows it: what it adds to the decoded prefix
    (a token decoded alone can differ: a SentencePiece word's leading space, one byte of a
    multi-byte character). A token that ends inside a character adds "" and the next one the
    whole character. Committed prefixes only grow, so a stream's updates decode only new tokens."""

    def __init__(self, tokenizer, mask_token_id: int):
        self.tokenizer, self.mask_token_id = tokenizer, mask_token_id
        self.skip = set(tokenizer.all_special_ids) | {mask_token_id}
        self.rows: dict[int, dict] = {}

    def extend(self, row: int, ids: list[int], logprobs: list[float], top_ids: list[list[int]],
               top: list[list[float]]) -> list[TokenLogprob]:
        state = self.rows.setdefault(row, {"position": 0, "kept": [], "text": "", "entries": []})
        end = ids.index(self.mask_token_id) if self.mask_token_id in ids else len(ids)
        for position in range(state["position"], end):
            token = ids[position]
            if token in self.skip:
                continue
            state["kept"].append(token)
            text = self.tokenizer.decode(state["kept"], skip_special_tokens=True)
            if text.endswith("\ufffd") and position < len(ids) - 1:
                piece = ""  # inside a character: the next token completes it
            else:
                piece = text[len(state["text"]):] if text.startswith(state["text"]) else self.tokenizer.decode([token])
                state["text"] = text
            alternatives = [(self.tokenizer.decode([alt]), value) for alt, value in zip(top_ids[position], top[position])]
            state["entries"].append(TokenLogprob(piece, token, logprobs[position], alternatives))
        state["position"] = max(state["position"], end)
        return list(state["entries"])


@contextmanager
def _cpu_rank_binding(ranks: int):
    """On vLLM's CPU platform, bind each rank's OpenMP threads to its own cores while the engine
    starts, unless the user set `VLLM_CPU_OMP_THREADS_BIND` (vLLM's own setting wins).

    This process's allowed cores are split evenly between the ranks; each rank takes
    `OMP_NUM_THREADS` of its share when that is set, else all of it. vLLM's automatic binding
    would instead keep one core per rank for its scheduler process (idle while a diffusion batch
    decodes inside the workers: one core of two left unused) and refuses TP > 1 on a single NUMA
    node. The variable is restored afterwards (the engine's processes have read it by then).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        yield
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(f"tensor_parallel_size={ranks} needs at least {ranks} CPU cores; {len(cores)} are allowed")
    per_rank = len(cores) // ranks
    threads = per_rank
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = min(int(os.environ["OMP_NUM_THREADS"]), per_rank)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(map(str, cores[r * per_rank:r * per_rank + threads])) for r in range(ranks)
    )
    try:
        yield
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


class _NoChatWarmupWarning(logging.Filter):
    """vLLM's `LLM` renders a dummy conversation ("warmup") with the tokenizer's chat template at
    start-up and logs a traceback when the tokenizer cannot encode it (the shipped character-level
    models have no letters). Diffusion decoding never uses vLLM's chat rendering (the server
    renders chats itself), so that warning is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


@contextmanager
def _without_chat_warmup_warning():
    log = logging.getLogger("vllm.renderers.base")
    quiet = _NoChatWarmupWarning()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def checkpoint_dtype(config: dict) -> str:
    """The dtype a checkpoint was saved in (vLLM's `auto` would pick bf16 on CPU for fp32)."""
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


class DiffusionLLM:
    """A checkpoint of a registered family (plain or compressed-tensors) served by vLLM for diffusion decoding.

    Args:
        model: checkpoint directory.
        tensor_parallel_size: vLLM tensor-parallel ranks.
        dtype: `auto` (the checkpoint's; float32 for a bf16 checkpoint on a CPU without bf16 units),
            `float32`, `bfloat16` (`EmulatedPrecisionWarning` without bf16 units) or `float16`.
        max_batch_size: prompts decoded per RPC; larger batches are split.
        **engine_kwargs: passed to `vllm.LLM` (e.g. `max_model_len`).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_batch_size: int = 64,
        **engine_kwargs,
    ):
        # A corrupted checkpoint or one vLLM cannot serve is refused here, in this process, before
        # the engine starts (its workers would fail with the cause only in their logs).
        checkpoint = validate_checkpoint(model)
        from vllm.platforms import current_platform

        check_servable(checkpoint, tensor_parallel_size, on_cpu=current_platform.is_cpu())
        config = checkpoint.config
        self.model_dir = Path(model)
        self.mask_token_id = config["mask_token_id"]
        self.max_sequence_length = checkpoint.model_config.max_position_embeddings
        self.max_batch_size = max_batch_size
        self.tokenizer = checkpoint.tokenizer
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        from .plugin import register

        register()  # this process too (entry points cover vLLM's own processes)
        # The loop runs outside vLLM's scheduler and keeps no KV cache: nothing to prefix-cache,
        # nothing to capture or compile.
        engine_kwargs.setdefault("enable_prefix_caching", False)
        engine_kwargs.setdefault("enforce_eager", True)
        engine_kwargs.setdefault("max_model_len", self.max_sequence_length)
        with _cpu_rank_binding(tensor_parallel_size), _without_chat_warmup_warning():
            self.llm = LLM(
                model=str(model),
                tokenizer=str(model),
                tensor_parallel_size=tensor_parallel_size,
                dtype=serving_dtype(dtype, checkpoint_dtype(config), hardware_precisions()),
                worker_extension_cls=WORKER_EXTENSION,
                **engine_kwargs,
            )

    def generate(self, prompts: str | list[str], params: DiffusionSamplingParams,
                 add_special_tokens: bool = True) -> list[DiffusionCompletion]:
        """Decode every prompt (batched, left-padded); continuations with special tokens skipped.
        `add_special_tokens=False` for prompts that already hold them (rendered chat templates)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(params, DiffusionSamplingConfig):
            raise TypeError(f"params must be DiffusionSamplingParams, got {type(params).__name__}")
        self.validate(prompts, params, add_special_tokens)
        completions = []
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = prompts[start:start + self.max_batch_size]
            batch = self.tokenizer(chunk, padding=True, add_special_tokens=add_special_tokens)
            result = self.llm.collective_rpc(
                "starquant_diffusion_generate", args=(batch["input_ids"], batch["attention_mask"], asdict(params))
            )[0]
            completions.extend(self._completions(chunk, result))
        return completions

    def _completions(self, prompts: list[str], result: dict, texts: "_TextTokens | None" = None) -> list[DiffusionCompletion]:
        generated = result["generated"]
        decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        logprobs = self._logprobs(generated, result["logprobs"], texts)
        return [DiffusionCompletion(p, t, ids, result["steps"], None if logprobs is None else logprobs[row])
                for row, (p, t, ids) in enumerate(zip(prompts, decoded, generated))]

    def _logprobs(self, generated: list[list[int]], record: dict | None,
                  texts: "_TextTokens | None" = None) -> list[list[TokenLogprob]] | None:
        """Per row, the `TokenLogprob` of each committed text token before the first masked position
        (special tokens are skipped, as in the text); `texts` keeps what earlier updates decoded."""
        if record is None:
            return None
        texts = texts or _TextTokens(self.tokenizer, self.mask_token_id)
        return [texts.extend(row, ids, record["token"][row], record["top_ids"][row], record["top"][row])
                for row, ids in enumerate(generated)]

    def generate_stream(self, prompts: list[str], params: DiffusionSamplingParams, add_special_tokens: bool = True,
                        steps_per_update: int = 1) -> Iterator[DiffusionProgress]:
        """Decode one batch (at most `max_batch_size` prompts), yielding a `DiffusionProgress` every
        `steps_per_update` steps; the last one carries the completions (the same as `generate`'s).
        Closing the iterator early (a cancelled request) stops the decoding in the workers."""
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"a stream decodes one batch: {len(prompts)} prompts exceed max_batch_size={self.max_batch_size}")
        self.validate(prompts, params, add_special_tokens)
        batch = self.tokenizer(prompts, padding=True, add_special_tokens=add_special_tokens)
        key, texts = uuid.uuid4().hex, _TextTokens(self.tokenizer, self.mask_token_id)
        self.llm.collective_rpc("starquant_stream_open", args=(key, batch["input_ids"], batch["attention_mask"],
                                                                asdict(params)))
        done = False
        try:
            while not done:
                update = self.llm.collective_rpc("starquant_stream_advance", args=(key, steps_per_update))[0]
                done = update["done"]
                generated = update["generated"]
                progress = DiffusionProgress(update["steps"], [self._committed_text(ids) for ids in generated],
                                             [self._canvas_tokens(ids) for ids in generated],
                                             logprobs=self._logprobs(generated, update["logprobs"], texts))
                if done:
                    progress.completions = self._completions(prompts, update, texts)
                yield progress
        finally:
            if not done:
                self.llm.collective_rpc("starquant_stream_close", args=(key,))

    def _committed_text(self, ids: list[int]) -> str:
        """The decoded tokens before the first masked one; a trailing incomplete character (U+FFFD of
        a multi-byte sequence split by a mask) is held back until it is complete."""
        end = ids.index(self.mask_token_id) if self.mask_token_id in ids else len(ids)
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        return text[:-1] if end < len(ids) and text.endswith("\ufffd") else text

    def _canvas_tokens(self, ids: list[int]) -> list[str | None]:
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        # None only where masked; an id the tokenizer has no token for (a model vocabulary larger
        # than the tokenizer's) shows as "".
        return [None if i == self.mask_token_id else (t if t is not None else "") for i, t in zip(ids, tokens)]

    def validate(self, prompts: list[str], params: DiffusionSamplingConfig, add_special_tokens: bool = True) -> None:
        """ValueError naming the prompt when one is empty or its canvas exceeds the model's length."""
        for index, prompt in enumerate(prompts):
            length = len(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
            if length == 0:
                raise ValueError(f"prompt {index}: empty (the tokenizer produced no tokens)")
            if length + params.gen_length > self.max_sequence_length:
                raise ValueError(
                    f"prompt {index}: {length} prompt tokens + gen_length {params.gen_length} exceeds "
                    f"max_sequence_length={self.max_sequence_length}"
                )

    def generate_texts(self, prompts: list[str], sampling: DiffusionSamplingConfig) -> list[str]:
        """The evaluation runner's backend interface (`starquant_plugin.evaluation.GenerateFn`)."""
        return [completion.text for completion in self.generate(prompts, sampling)]

    def score(self, prompt_ids: list[int], answer_ids: list[int], mc_samples: int = 128, batch_size: int = 16,
              seed: int = 0, greedy: bool = True) -> tuple[float, bool | None]:
        """(masked NLL of `answer_ids` after `prompt_ids`, whether greedy decoding reproduces them): the
        core's `starquant_plugin.diffusion.score_answer`, run in the workers."""
        return tuple(self.llm.collective_rpc(
            "starquant_score", args=(list(prompt_ids), list(answer_ids), mc_samples, batch_size, seed, greedy))[0])

    def logits(self, input_ids: list[list[int]], attention_mask: list[list[int]] | None = None):
        """Logits [batch, seq, vocab] (float32 tensor) of canvases, as the decoding loop sees them."""
        import torch

        if attention_mask is None:
            attention_mask = [[1] * len(row) for row in input_ids]
        return torch.tensor(self.llm.collective_rpc("starquant_logits", args=(input_ids, attention_mask))[0])

    def block_outputs(self, input_ids: list[list[int]], attention_mask: list[list[int]]):
        """Every block's output [batch, seq, d_model] (float32 tensors, rank 0) on fixed canvases."""
        import torch

        outputs = self.llm.collective_rpc("starquant_block_outputs", args=(input_ids, attention_mask))[0]
        return [torch.tensor(output) for output in outputs]

    def model_info(self) -> dict:
        """Loaded model class, dtype, quantization method and block linear methods on rank 0."""
        return self.llm.collective_rpc("starquant_model_info")[0]

    def tensors(self, names: list[str]) -> list[dict]:
        """Named model parameters as loaded, one dict of float32 tensors per tensor-parallel rank."""
        import torch

        per_rank = self.llm.collective_rpc("starquant_tensors", args=(names,))
        return [{name: torch.tensor(values) for name, values in rank.items()} for rank in per_rank]

    def bench_steps(self, batch: int, prompt_length: int, params: DiffusionSamplingParams, steps: int,
                    warmup: int, logits_window: bool = True, seed: int = 0) -> dict:
        """Per-step seconds of denoising random prompts (rank 0's clock); see the worker's method."""
        return self.llm.collective_rpc(
            "starquant_bench_steps", args=(batch, prompt_length, asdict(params), steps, warmup, logits_window, seed)
        )[0]

    def release_weights(self) -> dict:
        """Resident weight bytes of rank 0 by part (lm_head, embedding, block.i), measured by freeing
        them: the engine cannot decode afterwards."""
        return self.llm.collective_rpc("starquant_release_weights")[0]

    def close(self) -> None:
        """Stop the engine's processes (also done at interpreter exit)."""
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()

    def __enter__(self) -> "DiffusionLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
