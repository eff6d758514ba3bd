"""lm-evaluation-harness adapter: the `starquant` model of `lm_eval`.

    starquant lm-eval --model starquant --model_args pretrained=DIR,backend=vllm --tasks TASK ...

`starquant lm-eval` is lm-eval's own command line (every option of `lm_eval run`) with this
model registered; lm-eval finds models only among its own, so plain `lm_eval --model starquant`
does not know it. From Python, importing this module registers it:

    import lm_eval, starquant_plugin.evaluation.harness
    lm_eval.simple_evaluate(model="starquant", model_args="pretrained=DIR", tasks=[...])

- `generate_until`: diffusion decoding (`DiffusionSamplingConfig`) of `max_gen_toks` tokens,
  rounded up to whole blocks, cut at the first `until` string.
- `loglikelihood`: minus LLaDA's Monte-Carlo masked-NLL bound (`diffusion.masked_nll`): the
  continuation masked at `mc_samples` stratified ratios (batches of `mc_batch_size`, seeded by
  `seed`), so a lower bound on the log-likelihood, deterministic for a seed; `is_greedy` is whether
  greedy decoding of the continuation (one block, one token per step) reproduces it.
- `loglikelihood_rolling`: the same bound on each of lm-eval's disjoint rolling windows, summed.

Backends: `core` (transformers, this process: full-precision, compressed-tensors and STaR-Quant
checkpoints, fake-quantized) and `vllm` (`DiffusionLLM`: vLLM's kernels, tensor parallelism).
Texts the tokenizer cannot read as written, canvases longer than the model's, and generation
options diffusion decoding cannot honour are refused with an error naming them.
"""

import json
import math

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from loguru import logger

from ..diffusion import DiffusionSamplingConfig, hf_logits_fn, score_answer
from ..errors import InputError
from .runner import encode_prompt, generate_texts

__all__ = ["StarQuantLM", "main"]

BACKENDS = ("core", "vllm")
# gen_kwargs lm-eval tasks send that diffusion decoding honours; the diffusion settings may be given too.
_DIFFUSION_KWARGS = ("steps", "block_length", "remasking", "threshold", "cfg_scale")


class _CoreBackend:
    def __init__(self, pretrained: str, dtype: str, device: str):
        import torch

        from ..loading import load

        self.torch = torch
        self.model, self.tokenizer = load(pretrained, dtype, device)
        self.mask_token_id = self.model.config.mask_token_id
        self.max_sequence_length = self.model.config.max_position_embeddings
        self.device = next(self.model.parameters()).device
        self.logits_fn = hf_logits_fn(self.model)

    def generate(self, prompts: list[str], sampling: DiffusionSamplingConfig, add_special_tokens: bool) -> list[str]:
        return generate_texts(self.model, self.tokenizer, prompts, sampling, self.mask_token_id, add_special_tokens)

    def score(self, prompt_ids, answer_ids, mc_samples, batch_size, seed, greedy):
        tensor = lambda ids: self.torch.tensor(ids, dtype=self.torch.long, device=self.device)  # noqa: E731
        return score_answer(self.logits_fn, tensor(prompt_ids), tensor(answer_ids), self.mask_token_id,
                            mc_samples, batch_size, seed, greedy, logits_window=True)


class _VLLMBackend:
    def __init__(self, pretrained: str, dtype: str, tensor_parallel_size: int, batch_size: int):
        from ..serving import DiffusionLLM

        self.llm = DiffusionLLM(pretrained, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                max_batch_size=batch_size)
        self.tokenizer, self.mask_token_id = self.llm.tokenizer, self.llm.mask_token_id
        self.max_sequence_length = self.llm.max_sequence_length

    def generate(self, prompts: list[str], sampling: DiffusionSamplingConfig, add_special_tokens: bool) -> list[str]:
        return [c.text for c in self.llm.generate(prompts, sampling, add_special_tokens=add_special_tokens)]

    def score(self, prompt_ids, answer_ids, mc_samples, batch_size, seed, greedy):
        return self.llm.score(prompt_ids, answer_ids, mc_samples, batch_size, seed, greedy)


@register_model("starquant")
class StarQuantLM(TemplateLM):
    """A diffusion LLM checkpoint (any registered family, full precision or quantized) for lm-eval.

    Args (`--model_args`):
        pretrained: checkpoint directory.
        backend: `core` or `vllm`.
        dtype: `auto`, `float32`, `bfloat16` or `float16`.
        tensor_parallel_size: vLLM ranks (`backend=vllm`).
        max_gen_toks: tokens generated when a task does not say (default 256).
        block_length, steps, remasking, threshold, cfg_scale, temperature: diffusion decoding
            (`DiffusionSamplingConfig`); `block_length` default 32 (whole generation if shorter),
            `steps` default one token per step; a task's `gen_kwargs` may override each.
        mc_samples, mc_batch_size: Monte-Carlo maskings per loglikelihood request and per batch
            (default 128 and 16, LLaDA's evaluation settings).
        seed: seed of the maskings and of sampling.
    lm-eval's own `batch_size` (prompts decoded together) and `device` (core backend) apply.
    """

    backend = "causal"  # how TemplateLM splits context and continuation tokens

    def __init__(self, pretrained: str, backend: str = "core", dtype: str = "auto", tensor_parallel_size: int = 1,
                 max_gen_toks: int = 256, block_length: int = 32, steps: int | None = None,
                 remasking: str = "low_confidence", threshold: float | None = None, cfg_scale: float = 0.0,
                 temperature: float = 0.0, mc_samples: int = 128, mc_batch_size: int = 16, seed: int = 0,
                 batch_size: int | str = 16, max_batch_size: int | None = None, device: str | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise InputError(f"model_args backend: one of {', '.join(BACKENDS)}, got {backend!r}")
        batch_size = _batch_size(batch_size)
        for name, value in (("max_gen_toks", max_gen_toks), ("block_length", block_length),
                            ("mc_samples", mc_samples), ("mc_batch_size", mc_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"model_args {name}: a positive integer, got {value!r}")
        if mc_samples % mc_batch_size:
            raise InputError(f"model_args mc_samples={mc_samples} must be a multiple of mc_batch_size={mc_batch_size}")
        if backend == "vllm":
            self.model = _VLLMBackend(str(pretrained), dtype, tensor_parallel_size, batch_size)
        else:
            if tensor_parallel_size != 1:
                raise InputError("model_args tensor_parallel_size: needs backend=vllm")
            self.model = _CoreBackend(str(pretrained), dtype, device or "cpu")
        self.pretrained, self.batch_size = str(pretrained), batch_size
        self.tokenizer = self.model.tokenizer
        self.max_gen_toks, self.mc_samples, self.mc_batch_size, self.seed = max_gen_toks, mc_samples, mc_batch_size, seed
        self.decoding = {"block_length": block_length, "steps": steps, "remasking": remasking, "threshold": threshold,
                         "cfg_scale": cfg_scale, "temperature": temperature}
        self.sampling(max_gen_toks, {})  # a bad decoding setting is refused now, not at the first request

    # -- TemplateLM's interface ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of a continuation scored alone: BOS when the tokenizer has one."""
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.model.max_sequence_length

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """A conversation rendered by the checkpoint's chat template (lm-eval's `--apply_chat_template`).
        The template writes the special tokens it wants (BOS): a text that starts with the BOS token
        is tokenized without adding any (`tok_encode`)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"{self.pretrained}: the model has no chat template (tokenizer_config.json has no "
                             "chat_template): run without --apply_chat_template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _adds_special_tokens(self, text: str) -> bool:
        """Whether a request text gets the tokenizer's special tokens (BOS): not when it starts with
        the BOS token already (a rendered chat template, also one read back from lm-eval's cache)."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of a text (with the tokenizer's special tokens, BOS, unless told otherwise or the
        text starts with BOS), as the decoding paths tokenize prompts; InputError when the tokenizer
        cannot read it as written."""
        special = self._adds_special_tokens(string) if add_special_tokens is None else add_special_tokens
        return encode_prompt(self.tokenizer, string, self.model.mask_token_id, "request text", special)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for cache_key, context, continuation in requests:
            nll, greedy = self._score(context, continuation, greedy=True)
            results.append((-nll, greedy))
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, (-nll, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length - 1, context_len=1))
            total = -sum(self._score(context, continuation, greedy=False)[0] for context, continuation in windows)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):  # requests with the same settings decode in batches
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = self.sampling(gen_kwargs.pop("max_gen_toks", self.max_gen_toks), gen_kwargs)
            # Rendered chat templates (starting with BOS) and plain texts decode in separate batches.
            for special in (True, False):
                same = [i for i in indices if self._adds_special_tokens(requests[i].args[0]) == special]
                self._generate(requests, same, sampling, special, until, results)
        return results

    def _generate(self, requests, indices: list[int], sampling: DiffusionSamplingConfig, special: bool,
                  until: list[str], results: list) -> None:
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start:start + self.batch_size]
            contexts = [requests[i].args[0] for i in chunk]
            for i, context in zip(chunk, contexts):
                self._check_canvas(len(self.tok_encode(context)) + sampling.gen_length, f"request {i}")
            for i, text in zip(chunk, self.model.generate(contexts, sampling, special)):
                cuts = [text.find(s) for s in until if s and s in text]
                results[i] = text[:min(cuts)] if cuts else text
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])

    # -- helpers ---------------------------------------------------------------------------------

    def sampling(self, max_gen_toks, gen_kwargs: dict) -> DiffusionSamplingConfig:
        """Decoding settings of a task's `gen_kwargs` (lm-eval's names and the diffusion ones); an
        InputError names any option diffusion decoding cannot honour. The generation is
        `max_gen_toks` rounded up to whole blocks."""
        options = {**self.decoding, **{k: gen_kwargs.pop(k) for k in _DIFFUSION_KWARGS if k in gen_kwargs}}
        for name in ("temperature", "top_k", "top_p"):
            if name in gen_kwargs:
                options[name] = gen_kwargs.pop(name)
        if gen_kwargs.pop("do_sample", None) is False:
            options["temperature"] = 0.0
        if gen_kwargs:
            raise InputError(f"gen_kwargs {', '.join(sorted(gen_kwargs))}: not supported by diffusion decoding")
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks <= 0:
            raise InputError(f"gen_kwargs max_gen_toks: a positive integer, got {max_gen_toks!r}")
        block = min(options.pop("block_length"), max_gen_toks)
        gen_length = math.ceil(max_gen_toks / block) * block
        try:
            return DiffusionSamplingConfig(gen_length=gen_length, block_length=block, seed=self.seed, **options)
        except (TypeError, ValueError) as error:
            raise InputError(f"decoding settings: {error}") from None

    def _score(self, context: list[int], continuation: list[int], greedy: bool) -> tuple[float, bool | None]:
        if not continuation:
            raise InputError("loglikelihood: the continuation has no tokens")
        self._check_canvas(len(context) + len(continuation), "loglikelihood request")
        return self.model.score(list(context), list(continuation), self.mc_samples, self.mc_batch_size, self.seed, greedy)

    def _check_canvas(self, length: int, name: str) -> None:
        if length > self.max_length:
            raise InputError(f"{name}: {length} tokens (context and continuation or generation) exceed the model's "
                             f"max_sequence_length={self.max_length}")


def _batch_size(value) -> int:
    """lm-eval passes `--batch_size` as given (`8`, `"8"`, `"auto"`); auto is the default, 16."""
    if value in ("auto", None) or str(value).startswith("auto:"):
        if value is not None and value != 16:
            logger.info("batch_size auto: decoding 16 prompts at a time")
        return 16
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise InputError(f"batch_size: a positive integer or auto, got {value!r}") from None
    if size <= 0:
        raise InputError(f"batch_size: a positive integer or auto, got {value!r}")
    return size


def main(argv: list[str]) -> int:
    """`starquant lm-eval ARGS`: lm-eval's command line with the `starquant` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0
