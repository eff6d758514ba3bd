"""The diffusion decoding loop inside vLLM's worker processes.

`DiffusionWorkerExtension` is mixed into vLLM's worker (`worker_extension_cls`); the engine
calls `starquant_diffusion_generate` on every worker through `LLM.collective_rpc`. Each
tensor-parallel rank runs the same loop in lock-step: logits are gathered over ranks by
the LM head, so every rank sees the same logits and commits the same tokens. The loop is
the core's `diffusion_generate`, so vLLM decoding has exactly the core's semantics.
"""

import ctypes
import gc
import os
import time
from dataclasses import fields

import torch

from ..diffusion import DiffusionSamplingConfig, diffusion_generate, diffusion_steps, score_answer
from ..models.family import family_of
from .kv_cache import CanvasKVCache, kv_cache_pass

__all__ = ["DiffusionWorkerExtension"]


class _Timed(Exception):
    """Raised by the benchmark's model call after its last timed step."""


def _resident_bytes() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, or RSS would not drop
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _allocated_bytes() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _predictions_fn(model):
    """The sampler's `logits_fn` for a vLLM model: predictions, with its family's logits shift."""
    return family_of(model.config).logits_fn(lambda ids, mask, window: model.diffusion_logits(ids, mask, window))


def _sampling(sampling: dict) -> tuple[DiffusionSamplingConfig, str, int | None]:
    """The core sampler's settings of an RPC's `DiffusionSamplingParams` dict, and the cache mode
    and refresh interval (the engine's own fields)."""
    core = {f.name for f in fields(DiffusionSamplingConfig)}
    return DiffusionSamplingConfig(**{k: v for k, v in sampling.items() if k in core}), \
        sampling.get("cache", "none"), sampling.get("cache_refresh_steps")


def _cached_predictions_fn(model, mode: str, refresh_steps: int | None, prompt_length: int, block_length: int):
    """The sampler's `logits_fn` with an approximate key/value cache (`serving.kv_cache`): the step
    that opens a block (the first masked position of the batch moved into a new block), and every
    `refresh_steps`-th step inside one, runs the whole canvas and records its keys/values; the
    other steps compute only the block (`dual`) or the block and everything right of it
    (`prefix`), from one position before the block (a family whose logits are shifted reads the
    prediction of a position from its left neighbour). Logits outside the computed positions
    (asked for only where the sampler draws noise over the whole canvas) are zero: no position
    there can be committed."""
    if mode == "none":
        return _predictions_fn(model)
    mask_token_id = model.config.mask_token_id
    cache, state = CanvasKVCache(), {"block": None, "steps": 0}

    def forward(ids: torch.Tensor, mask: torch.Tensor | None, window):
        masked = (ids[:, prompt_length:] == mask_token_id).any(dim=0)
        first = int(masked.nonzero()[0]) if bool(masked.any()) else ids.shape[1] - prompt_length - 1
        block = first // block_length
        start = prompt_length + block * block_length
        span = (max(start - 1, 0), start + block_length if mode == "dual" else ids.shape[1])
        opens = block != state["block"]
        state["steps"] = 0 if opens else state["steps"] + 1
        refresh = opens or (refresh_steps is not None and state["steps"] % refresh_steps == 0)
        if refresh:
            state["block"] = block
            with kv_cache_pass(cache, None):
                logits = model.diffusion_logits(ids, mask, window)
            if refresh_steps != 1:
                return logits
        with kv_cache_pass(cache, span):
            if window is not None:
                return model.diffusion_logits(ids, mask, window, span=span)
            inside = model.diffusion_logits(ids, mask, span=span)
        logits = inside.new_zeros(ids.shape[0], ids.shape[1], inside.shape[-1])
        logits[:, span[0]:span[1]] = inside
        return logits

    return family_of(model.config).logits_fn(forward)


def _logprobs(record) -> dict | None:
    """A `TokenLogprobs` as lists for the RPC reply (None when not recorded)."""
    if record is None:
        return None
    return {"token": record.token.cpu().tolist(), "top_ids": record.top_ids.cpu().tolist(),
            "top": record.top.cpu().tolist()}


def _detach(model: torch.nn.Module, path: str) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, None)


class DiffusionWorkerExtension:
    """Methods added to vLLM's worker class (`self` is the worker)."""

    def _starquant_canvases(self, input_ids: list[list[int]], attention_mask: list[list[int]]):
        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
        return model, as_tensor(input_ids), as_tensor(attention_mask)

    def starquant_diffusion_generate(
        self, input_ids: list[list[int]], attention_mask: list[list[int]], sampling: dict
    ) -> dict:
        """Left-padded prompts [batch, prompt_len] -> {"generated": ids [batch, gen_length], "steps": int,
        "logprobs": the generated tokens' (`DiffusionSamplingConfig.logprobs`) or None}."""
        model, ids, mask = self._starquant_canvases(input_ids, attention_mask)
        config, cache, refresh = _sampling(sampling)
        with torch.inference_mode():
            output = diffusion_generate(
                _cached_predictions_fn(model, cache, refresh, ids.shape[1], config.block_length), ids,
                model.config.mask_token_id, config, mask, logits_window=True,
            )
        return {"generated": output.generated.cpu().tolist(), "steps": output.steps,
                "logprobs": _logprobs(output.logprobs)}

    def starquant_score(self, prompt_ids: list[int], answer_ids: list[int], mc_samples: int, batch_size: int,
                        seed: int, greedy: bool) -> tuple[float, bool | None]:
        """`score_answer` of an answer after a prompt (token ids): (masked NLL, greedy reproduces it)."""
        model, ids, _ = self._starquant_canvases([prompt_ids + answer_ids], [[1] * (len(prompt_ids) + len(answer_ids))])
        with torch.inference_mode():
            return score_answer(_predictions_fn(model), ids[0, :len(prompt_ids)], ids[0, len(prompt_ids):],
                                model.config.mask_token_id, mc_samples, batch_size, seed, greedy, logits_window=True)

    def starquant_stream_open(self, key: str, input_ids: list[list[int]], attention_mask: list[list[int]],
                              sampling: dict) -> None:
        """Start decoding a batch step by step (`starquant_stream_advance`), under `key`."""
        model, ids, mask = self._starquant_canvases(input_ids, attention_mask)
        config, cache, refresh = _sampling(sampling)
        steps = diffusion_steps(_cached_predictions_fn(model, cache, refresh, ids.shape[1], config.block_length), ids,
                                model.config.mask_token_id, config, mask, logits_window=True)
        self.__dict__.setdefault("_starquant_streams", {})[key] = (steps, ids.shape[1])

    def starquant_stream_advance(self, key: str, max_steps: int) -> dict:
        """Up to `max_steps` more steps of stream `key`: {"generated": ids [batch, gen_length] of the
        canvas now (the mask id where still masked), "steps": steps so far, "done": finished,
        "logprobs": of the tokens committed so far, or None}. A finished stream is closed."""
        streams = self.__dict__.get("_starquant_streams", {})
        steps, prompt_length = streams[key]
        mask_token_id = self.model_runner.get_model().config.mask_token_id
        canvas, taken, done, record = None, None, False, None
        with torch.inference_mode():
            for index in range(max_steps + 1):
                # One more resumption once nothing is masked: it finishes without a model call, so
                # the last step's update is also the final one.
                if index == max_steps and (canvas is None or bool((canvas[:, prompt_length:] == mask_token_id).any())):
                    break
                try:
                    step = next(steps)
                except StopIteration as finished:
                    canvas, taken, done = finished.value.sequences, finished.value.steps, True
                    record = finished.value.logprobs
                    del streams[key]
                    break
                canvas, taken, record = step.canvas, step.step + 1, step.logprobs
        return {"generated": canvas[:, prompt_length:].cpu().tolist(), "steps": taken, "done": done,
                "logprobs": _logprobs(record)}

    def starquant_stream_close(self, key: str) -> None:
        """Drop stream `key` (a cancelled request); its generator and canvases are freed."""
        self.__dict__.get("_starquant_streams", {}).pop(key, None)

    def starquant_bench_steps(
        self, batch: int, prompt_length: int, sampling: dict, steps: int, warmup: int, logits_window: bool, seed: int
    ) -> dict:
        """Seconds of `warmup + steps` denoising steps (model forward + the sampler's commit) on random
        prompts of `prompt_length` tokens: {"seconds": [...], "block_seconds": [...], "threads": torch
        threads of this rank}; `block_seconds` is the part of each step spent inside the blocks (the
        rest: embedding, final norm, LM head, sampler), for extrapolating to other depths.

        A step is timed from one model call to the next, so it includes the sampler's work;
        decoding stops after the last timed step.
        """
        model = self.model_runner.get_model()
        config, device = model.config, next(model.parameters()).device
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, config.vocab_size - 1, (batch, prompt_length), generator=generator)
        ids[ids >= config.mask_token_id] += 1  # any token but the mask
        sampling, cache, refresh = _sampling(sampling)
        if sampling.steps < warmup + steps + 1:
            raise ValueError(f"{warmup} warm-up + {steps} timed steps need a decoding of more than {sampling.steps} steps")
        stamps, in_blocks, started = [], [0.0], {}
        predictions = _cached_predictions_fn(model, cache, refresh, prompt_length, sampling.block_length)

        def synchronize():
            if device.type == "cuda":
                torch.cuda.synchronize()

        def timed(input_ids, attention_mask, window=None):
            synchronize()
            stamps.append((time.perf_counter(), in_blocks[0]))
            if len(stamps) > warmup + steps:
                raise _Timed
            return predictions(input_ids, attention_mask, window)

        def enter(module, args):
            synchronize()
            started[module] = time.perf_counter()

        def leave(module, args, output):
            synchronize()
            in_blocks[0] += time.perf_counter() - started.pop(module)

        blocks = model.get_submodule(family_of(config).vllm_blocks)
        hooks = [hook for block in blocks for hook in (block.register_forward_pre_hook(enter),
                                                      block.register_forward_hook(leave))]
        try:
            with torch.inference_mode():
                try:
                    diffusion_generate(timed, ids.to(device), config.mask_token_id, sampling, logits_window=logits_window)
                except _Timed:
                    pass
        finally:
            for hook in hooks:
                hook.remove()
        seconds = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
        block_seconds = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
        return {"seconds": seconds[warmup:], "block_seconds": block_seconds[warmup:], "threads": torch.get_num_threads()}

    def starquant_release_weights(self) -> dict:
        """Resident bytes of the weights, measured by releasing them: the drop in this process's
        resident memory (CPU; allocated memory on GPU) when the LM head, the embedding and each block
        are freed in turn. Counts what kernels keep (oneDNN's repacked weights, packed int4), which
        parameter sizes do not. Leaves the model unusable: the engine's last call.
        """
        model = self.model_runner.get_model()
        family = family_of(model.config)
        blocks = model.get_submodule(family.vllm_blocks)
        device = next(model.parameters()).device
        measure = _allocated_bytes if device.type == "cuda" else _resident_bytes
        released = {}
        before = measure()

        def release(name: str, drop) -> None:
            nonlocal before
            drop()
            after = measure()
            released[name] = before - after
            before = after

        release("lm_head", lambda: _detach(model, family.vllm_lm_head))
        release("embedding", lambda: _detach(model, family.vllm_embedding))
        for index in range(len(blocks)):
            release(f"block.{index}", lambda: blocks.__setitem__(index, torch.nn.Identity()))
        return released

    def starquant_logits(self, input_ids: list[list[int]], attention_mask: list[list[int]]) -> list:
        """The model's raw logits [batch, seq, vocab] of fixed canvases (no logits shift, like the core
        model's forward), as nested float32 lists (for tests and checks)."""
        model, ids, mask = self._starquant_canvases(input_ids, attention_mask)
        with torch.inference_mode():
            return model.diffusion_logits(ids, mask).float().cpu().tolist()

    def starquant_block_outputs(self, input_ids: list[list[int]], attention_mask: list[list[int]]) -> list:
        """Each block's output [batch, seq, d_model] on fixed canvases (per-layer agreement checks)."""
        model, ids, mask = self._starquant_canvases(input_ids, attention_mask)
        outputs = []
        hooks = [
            block.register_forward_hook(lambda module, args, output: outputs.append(output.float().cpu()))
            for block in model.get_submodule(family_of(model.config).vllm_blocks)
        ]
        try:
            with torch.inference_mode():
                model.diffusion_logits(ids, mask)
        finally:
            for hook in hooks:
                hook.remove()
        return [output.tolist() for output in outputs]

    def starquant_model_info(self) -> dict:
        """What the worker loaded: model class, dtype, quantization method, the linear method of
        every block linear (by name) and the methods of the embedding and the LM head.

        (Parameter bytes would mislead: on CPU, vLLM repacks unquantized linear weights for
        oneDNN and leaves empty parameters behind.)
        """
        model = self.model_runner.get_model()
        family = family_of(model.config)
        linears, codes_gemm = {}, {}
        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            if name.startswith(family.vllm_blocks + ".") and method is not None:
                inner = getattr(method, "inner", None)
                linears[name] = type(method).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
                if getattr(method, "codes_gemm", None):
                    codes_gemm[name] = method.codes_gemm
        return {
            "class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype),
            "quantization": self.vllm_config.model_config.quantization,
            "linear_methods": linears,
            # Layers whose activation codes go straight into an integer GEMM (CPU), and which one.
            "codes_gemm": codes_gemm,
            "embedding_method": type(model.get_submodule(family.vllm_embedding).quant_method).__name__,
            "lm_head_method": type(model.get_submodule(family.vllm_lm_head).quant_method).__name__,
        }

    def starquant_tensors(self, names: list[str]) -> dict[str, list]:
        """Named parameters and buffers of this rank, as nested lists (tests check what was loaded)."""
        model = self.model_runner.get_model()
        parameters = {**dict(model.named_buffers()), **dict(model.named_parameters())}
        return {name: parameters[name].detach().float().cpu().tolist() for name in names}
