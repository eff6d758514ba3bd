"""The `starquant` command line.

    starquant eval [MODEL] [--tasks FILE.jsonl] [--json OUT] [--gen-length N] [--steps N]
                   [--block-length N] [--batch-size N] ...
    starquant generate [MODEL] --prompt TEXT [--gen-length N] [--steps N] ...
    starquant quantize [MODEL] --recipe RECIPE.yaml --output DIR [--dataset FILE] [--num-samples N] [--seed N]
    starquant serve [MODEL] [--port N] [--host H] [--tensor-parallel-size N] [--max-body-bytes N]  (serve environment)
    starquant bench [--shape shipped|llada-8b|dream-7b] [--layers N] [--canvas 256,512] [--batch 1,8]
                    [--variants bf16,w8a8,...] [--json OUT] [--decoding]                 (serve environment)

eval and generate take `--backend core|vllm` (vllm: the serve environment).

MODEL is a checkpoint directory of a supported family (LLaDA, Dream); without it the shipped model (and its evaluation set)
is used. Bad input exits with status 2 and one line naming the problem.
"""

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from loguru import logger

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """A user mistake reported as one line on stderr with exit status 2."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; unwinding removes staging directories (exit 128 + signal)."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


@contextlib.contextmanager
def _interrupts_raise():
    """Turn SIGINT and SIGTERM into `Interrupted`, so `finally`/`except` blocks clean up."""

    def handler(signal_number, frame):
        raise Interrupted(signal_number)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def _integer_list(text: str) -> list[int]:
    return [_integer(part) for part in text.split(",") if part]


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", type=Path, help="model directory, LLaDA or Dream format, or a hub id in the "
                        "local Hugging Face cache (default: the shipped model)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="torch device for the core backend, e.g. cpu or cuda")
    parser.add_argument(
        "--backend", default="core", choices=["core", "vllm"],
        help="core: transformers in this process (fake-quant for quantized checkpoints); vllm: a vLLM engine",
    )
    parser.add_argument("--tensor-parallel-size", type=_integer, default=1, help="vLLM tensor-parallel ranks")


def _add_sampling_arguments(parser: argparse.ArgumentParser, gen_length_help: str) -> None:
    from .diffusion.sampler import REMASKING

    group = parser.add_argument_group("diffusion decoding")
    group.add_argument("--gen-length", type=_integer, help=gen_length_help)
    group.add_argument("--steps", type=_integer, help="denoising steps in total (default: gen_length)")
    group.add_argument("--block-length", type=_integer, help="semi-autoregressive block (default: gen_length)")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--remasking", default="low_confidence", choices=list(REMASKING),
                       help="which proposals a step commits (maskgit_plus = low_confidence; see docs/serving.md)")
    group.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale")
    group.add_argument("--threshold", type=float, help="confidence threshold for parallel decoding (Fast-dLLM)")
    group.add_argument("--cache", default="none", choices=["none", "prefix", "dual"],
                       help="approximate key/value cache of block-wise decoding (--backend vllm; docs/serving.md)")
    group.add_argument("--cache-refresh-steps", type=_integer,
                       help="with --cache: also refresh it every N steps inside a block (1: exact)")
    group.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from .bench.shapes import SHAPES
    from .bench.runner import DEFAULT_VARIANTS, VARIANTS  # torch and transformers are loaded by the package anyway

    parser = argparse.ArgumentParser(prog="starquant", description="STaR-Quant for diffusion LLMs")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="exact-match evaluation with diffusion decoding")
    _add_model_argument(evaluate)
    evaluate.add_argument("--tasks", type=Path, help="JSON lines {prompt, answer, task?} (default: MODEL/eval.jsonl)")
    evaluate.add_argument("--json", type=Path, dest="json_out", help="write the result as JSON here")
    evaluate.add_argument("--batch-size", type=_integer, default=32)
    evaluate.add_argument("--limit", type=_integer, help="evaluate only the first N examples")
    _add_sampling_arguments(evaluate, "tokens to generate (default: the longest answer in tokens)")

    quantize = commands.add_parser("quantize", help="calibrate with a recipe and write a compressed checkpoint")
    quantize.add_argument("model", nargs="?", type=Path, help="model directory, LLaDA or Dream format, or a hub id in the "
                          "local Hugging Face cache (default: the shipped model)")
    quantize.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                          help="precision the model is loaded and calibrated in (default: the checkpoint's)")
    quantize.add_argument("--device", default="auto",
                          help="where each block is calibrated: auto (the first GPU, else the CPU), cpu, cuda, cuda:N")
    quantize.add_argument("--recipe", type=Path, required=True, help="llm-compressor YAML recipe (see recipes/)")
    quantize.add_argument("--output", type=Path, required=True, help="checkpoint directory to create")
    quantize.add_argument("--dataset", type=Path, help='JSON lines {"prompt","answer"} or {"text"} (default: MODEL/calibration.jsonl)')
    quantize.add_argument("--num-samples", type=_integer, default=256, help="masked calibration canvases")
    quantize.add_argument("--samples-per-record", type=_integer, default=4, help="mask ratios per record")
    quantize.add_argument("--seed", type=int, default=0)
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing --output")

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server on a vLLM engine")
    serve.add_argument("model", nargs="?", type=Path, help="model directory, LLaDA or Dream format, or a hub id in the "
                       "local Hugging Face cache (default: the shipped model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_integer, default=8000)
    serve.add_argument("--served-model-name", help="model id in /v1/models (default: the directory name)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--tensor-parallel-size", type=_integer, default=1)
    serve.add_argument("--max-batch-size", type=_integer, default=64, help="prompts decoded together")
    serve.add_argument("--max-pending", type=_integer, default=256, help="waiting prompts before answering 503")
    serve.add_argument("--max-body-bytes", type=_integer, default=1 << 20,
                       help="largest request body accepted; larger ones are answered 413 (default 1 MiB)")

    bench = commands.add_parser("bench", help="time and size the bf16 baseline and quantized variants on vLLM")
    bench.add_argument("--shape", default="shipped", choices=list(SHAPES),
                       help="shipped: the shipped model; llada-8b / dream-7b: LLaDA-8B's / Dream-7B's shapes with "
                            "random weights")
    bench.add_argument("--layers", type=_integer, help="transformer blocks of --shape llada-8b / dream-7b (default 2)")
    bench.add_argument("--canvas", type=_integer_list, default=[256, 512, 1024], help="canvas lengths, e.g. 256,512")
    bench.add_argument("--batch", type=_integer_list, default=[1, 8], help="batch sizes, e.g. 1,8")
    bench.add_argument("--variants", type=_name_list, default=None,
                       help=f"comma-separated, from {','.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)}; with --decoding: bf16,starquant_w4a8)")
    bench.add_argument("--steps", type=_integer, default=5, help="timed denoising steps (the median is reported)")
    bench.add_argument("--warmup", type=_integer, default=2, help="untimed steps first")
    bench.add_argument("--cache", default="none", choices=["none", "prefix", "dual"],
                       help="time decoding with this key/value cache: a whole block of steps, averaged")
    bench.add_argument("--full-lm-head", action="store_true",
                       help="run the LM head on the whole canvas (the baseline of the windowed head)")
    bench.add_argument("--json", type=Path, dest="json_out", help="write every figure as JSON here")
    bench.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "starquant" / "bench",
                       help="where the variants' checkpoints are written (and reused)")
    bench.add_argument("--recipes", type=Path, help="recipes directory (default: the project's recipes/)")
    bench.add_argument("--quantize-command", help="command that runs `starquant quantize` (default: found)")
    bench.add_argument("--num-samples", type=_integer, default=64, help="calibration canvases per quantization")
    bench.add_argument("--decoding", action="store_true",
                       help="instead: decoding efficiency on the shipped model (thresholds vs fixed steps)")
    bench.add_argument("--thresholds", type=_float_list, default=[0.7, 0.8, 0.9, 0.95])
    bench.add_argument("--limit", type=_integer, default=200, help="--decoding: evaluation prompts")

    commands.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness with the `starquant` model: lm_eval's "
                        "own arguments, e.g. --model starquant --model_args pretrained=DIR --tasks T (serve env)")

    generate = commands.add_parser("generate", help="print the generation for one prompt")
    _add_model_argument(generate)
    generate.add_argument("--prompt", required=True)
    _add_sampling_arguments(
        generate, "tokens to generate (default: the longest answer of the model's eval.jsonl, else 32)")
    return parser


def _sampling_options(args: argparse.Namespace) -> dict:
    return {
        "gen_length": args.gen_length,
        "steps": args.steps,
        "block_length": args.block_length,
        "temperature": args.temperature,
        "remasking": args.remasking,
        "cfg_scale": args.cfg_scale,
        "threshold": args.threshold,
        "seed": args.seed,
    }


def _resolve_model(args: argparse.Namespace) -> Path:
    """MODEL: a directory, or a hub id in the local Hugging Face cache; none: the shipped model."""
    from .assets import SHIPPED_MODEL
    from .models.loading import resolve_model

    return resolve_model(args.model) if args.model is not None else SHIPPED_MODEL


def _print_table(result, model_dir: Path) -> None:
    rows = [(task, f"{score * 100:.2f}") for task, score in result.per_task.items()]
    rows.append(("all", f"{result.exact_match * 100:.2f}"))
    width = max(len(r[0]) for r in rows + [("task", "")])
    print(f"model: {model_dir}   n={result.n}   " + " ".join(
        f"{k}={result.settings[k]}" for k in ("gen_length", "steps", "block_length")))
    print(f"{'task':<{width}}  exact_match(%)")
    for task, score in rows:
        print(f"{task:<{width}}  {score:>14}")


def _vllm_logs_to_stderr() -> None:
    # vLLM logs to stdout by default; stdout carries the command's own output (generations, tables).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def _load_backend(args: argparse.Namespace, model_dir: Path):
    """(generate_fn, tokenizer) of the chosen backend; see `starquant_plugin.evaluation.GenerateFn`."""
    if args.tensor_parallel_size <= 0:
        raise UsageError(f"--tensor-parallel-size must be positive, got {args.tensor_parallel_size}")
    if args.backend == "core" and (args.cache != "none" or args.cache_refresh_steps is not None):
        raise UsageError("--cache needs --backend vllm (the cache lives in vLLM's workers)")
    if args.backend == "core":
        from .evaluation import core_generate_fn
        from .loading import load as load_checkpoint

        if args.tensor_parallel_size != 1:
            raise UsageError("--tensor-parallel-size needs --backend vllm")
        model, tokenizer = load_checkpoint(model_dir, args.dtype, args.device)
        return core_generate_fn(model, tokenizer, model.config.mask_token_id), tokenizer
    from importlib.util import find_spec

    if find_spec("vllm") is None:
        raise UsageError("--backend vllm needs vLLM: run it from the serve environment (.venv/serve)")
    _vllm_logs_to_stderr()
    from .serving import DiffusionLLM

    llm = DiffusionLLM(model_dir, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype)
    return llm.generate_texts, llm.tokenizer


def _engine_sampling(args: argparse.Namespace, sampling):
    """`sampling` with the engine's cache settings (`--cache`), as `DiffusionSamplingParams`."""
    if args.cache == "none" and args.cache_refresh_steps is None:
        return sampling
    from dataclasses import asdict

    from .serving.engine import DiffusionSamplingParams

    return DiffusionSamplingParams(**asdict(sampling), cache=args.cache, cache_refresh_steps=args.cache_refresh_steps)


def _refuse_unreadable_texts(
    model_dir: Path, prompts: list[tuple[str, str]], answers: list[tuple[str, str]] | None = None
) -> None:
    """InputError naming the first `(name, text)` the model cannot read as written (a character
    outside its vocabulary, a lone surrogate; in a prompt also the mask token), before a model loads."""
    from .evaluation.runner import encode_prompt
    from .models import load_tokenizer, read_model_config

    mask_token_id = read_model_config(model_dir)["mask_token_id"]
    tokenizer = load_tokenizer(model_dir)
    for name, prompt in prompts:
        encode_prompt(tokenizer, prompt, mask_token_id, name)
    for name, answer in answers or []:
        encode_prompt(tokenizer, answer, None, name, add_special_tokens=False)


def run_eval(args: argparse.Namespace) -> None:
    from .assets import SHIPPED_EVAL_SET
    from .evaluation import default_sampling, evaluate_examples, load_tasks

    model_dir = _resolve_model(args)
    tasks_path = args.tasks
    if tasks_path is None:
        tasks_path = SHIPPED_EVAL_SET if args.model is None else model_dir / "eval.jsonl"
        if not tasks_path.is_file():
            raise UsageError(f"--tasks FILE.jsonl is required: {model_dir} ships no eval.jsonl")
    examples = load_tasks(tasks_path)
    if args.limit:
        examples = examples[: args.limit]
    _refuse_unreadable_texts(
        model_dir,
        [(f"{tasks_path}: example {i + 1}: prompt", e.prompt) for i, e in enumerate(examples)],
        [(f"{tasks_path}: example {i + 1}: answer", e.answer) for i, e in enumerate(examples)],
    )
    generate_fn, tokenizer = _load_backend(args, model_dir)
    sampling = _engine_sampling(args, default_sampling(tokenizer, examples, **_sampling_options(args)))
    logger.info(f"evaluating {model_dir} on {len(examples)} examples from {tasks_path} ({args.backend} backend)")
    result = evaluate_examples(
        generate_fn,
        examples,
        sampling,
        batch_size=args.batch_size,
        extra_settings={
            "model": str(model_dir), "tasks": str(tasks_path), "backend": args.backend, "dtype": args.dtype,
            "tensor_parallel_size": args.tensor_parallel_size, "cache": args.cache,
            "cache_refresh_steps": args.cache_refresh_steps,
        },
    )
    _print_table(result, model_dir)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        logger.info(f"wrote {args.json_out}")


def _default_gen_length(model_dir: Path) -> int:
    """generate's default: the longest answer (in tokens) of the model's own task set, its
    eval.jsonl, as `eval` uses; 32 for a model without one."""
    tasks = model_dir / "eval.jsonl"
    if not tasks.is_file():
        return 32
    from .evaluation import default_sampling, load_tasks
    from .models import load_tokenizer

    return default_sampling(load_tokenizer(model_dir), load_tasks(tasks)).gen_length


def run_generate(args: argparse.Namespace) -> None:
    from .diffusion import DiffusionSamplingConfig

    model_dir = _resolve_model(args)
    options = _sampling_options(args)
    if options["gen_length"] is None:
        options["gen_length"] = _default_gen_length(model_dir)
    sampling = _engine_sampling(args, DiffusionSamplingConfig(**options))  # bad settings fail before a model loads
    _refuse_unreadable_texts(model_dir, [("--prompt", args.prompt)])
    generate_fn, _ = _load_backend(args, model_dir)
    (text,) = generate_fn([args.prompt], sampling)
    print(text)


def run_serve(args: argparse.Namespace) -> None:
    from importlib.util import find_spec

    if find_spec("vllm") is None:
        raise UsageError("serve needs vLLM: run it from the serve environment (.venv/serve)")
    _vllm_logs_to_stderr()
    for name in ("port", "tensor_parallel_size", "max_batch_size", "max_pending", "max_body_bytes"):
        value = getattr(args, name)
        if value <= 0 or (name == "port" and value > 65535):
            raise UsageError(f"--{name.replace('_', '-')} out of range: {value}")
    from .models import read_model_config
    from .serving.server import serve

    model_dir = _resolve_model(args)
    read_model_config(model_dir)
    serve(model_dir, args.host, args.port, args.served_model_name, args.tensor_parallel_size, args.dtype,
          args.max_batch_size, args.max_pending, args.max_body_bytes)


def run_quantize(args: argparse.Namespace) -> None:
    from importlib.util import find_spec

    if find_spec("llmcompressor") is None:
        raise UsageError("quantize needs llm-compressor: run it from the compress environment (.venv/compress)")
    from .compress.quantize import quantize

    with _interrupts_raise():
        summary = quantize(
            _resolve_model(args), args.recipe, args.output, args.dataset, args.num_samples,
            args.samples_per_record, args.seed, args.overwrite, dtype=args.dtype, device=args.device,
        )
    ratio = summary["original_weights_bytes"] / max(summary["weights_bytes"], 1)
    print(
        f"wrote {summary['output']}: schemes {', '.join(summary['schemes']) or 'none'}"
        f"{'; STaR-Quant ' + '+'.join(summary['starquant']) if summary['starquant'] else ''}; "
        f"weights on disk {summary['weights_bytes'] / 2**20:.2f} MiB (from {summary['original_weights_bytes'] / 2**20:.2f} MiB, "
        f"{ratio:.2f}x smaller{'; ' + ', '.join(summary['formats']) if summary['formats'] else ''}); {summary['seconds']} s"
    )
    print("stage                            seconds  peak memory (MiB)")
    for row in summary["stages"]:
        print(f"{row['name']:<32} {row['seconds']:>7.1f}  {row['peak_memory_bytes'] / 2**20:>17.0f}")
    for reason in summary["core_only"]:
        print(f"core-only (starquant eval / starquant_plugin.load; vLLM cannot serve it): {reason}")
    for size, problem in summary["tensor_parallel"].items():
        if problem is not None:
            print(f"not servable with --tensor-parallel-size {size}: {problem}")


def run_bench(args: argparse.Namespace) -> None:
    from importlib.util import find_spec

    if find_spec("vllm") is None:
        raise UsageError("bench needs vLLM: run it from the serve environment (.venv/serve)")
    _vllm_logs_to_stderr()
    from .bench import BenchSettings, format_decoding_table, format_table, run_bench as bench, run_decoding_bench

    settings = BenchSettings(
        shape=args.shape, layers=args.layers, canvases=args.canvas, batches=args.batch,
        steps=args.steps, warmup=args.warmup, logits_window=not args.full_lm_head, work_dir=args.work_dir,
        quantize_command=args.quantize_command.split() if args.quantize_command else None,
        num_samples=args.num_samples, cache=args.cache,
    )
    if args.variants is not None:
        settings.variants = args.variants
    elif args.decoding:
        settings.variants = ["bf16", "starquant_w4a8"]
    if args.recipes is not None:
        settings.recipes = args.recipes
    if args.decoding:
        report = run_decoding_bench(settings, args.thresholds, args.limit)
        print(format_decoding_table(report))
    else:
        report = bench(settings)
        print(format_table(report))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        logger.info(f"wrote {args.json_out}")


def run_lm_eval(argv: list[str]) -> int:
    """`starquant lm-eval ARGS`: lm-eval's command line, the `starquant` model registered."""
    from importlib.util import find_spec

    if find_spec("lm_eval") is None:
        print("starquant lm-eval: error: lm-eval is not installed here: run it from the serve environment "
              "(.venv/serve/bin/starquant lm-eval ...)", file=sys.stderr)
        return 2
    _vllm_logs_to_stderr()
    from .evaluation.harness import main as harness_main

    try:
        return harness_main(argv)
    except ValueError as error:  # InputError: a model argument, request text or setting the model cannot take
        print(f"starquant lm-eval: error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # every other argument is lm-eval's own
        return run_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="<level>{level: <7}</level> {message}")
    try:
        {"eval": run_eval, "generate": run_generate, "quantize": run_quantize, "serve": run_serve,
         "bench": run_bench}[args.command](args)
    except (UsageError, ValueError) as error:
        print(f"starquant {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as interrupt:
        print(f"starquant {args.command}: interrupted by {interrupt}; nothing was written", file=sys.stderr)
        return 128 + interrupt.signal_number
    return 0


if __name__ == "__main__":
    sys.exit(main())
