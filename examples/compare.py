"""Quantize a model (default: the shipped one; any LLaDA or Dream checkpoint) with every recipe
and compare: exact match, masked NLL, drift.

    .venv/compress/bin/python examples/compare.py [--model DIR] [--limit N] [--only NAME ...]
    .venv/compress/bin/python examples/compare.py [--model DIR] [--docs DIR] --plots-only

Writes `docs/results.md` (table + the commands), `docs/results.json`, and PNG plots in
`docs/figures/`: activation ranges per layer for masked vs unmasked tokens, and drift per
denoising step for STaR-Quant W4A4 with and without TAC. Every number is measured in the run.
`--plots-only` redraws the figures from an existing results.json without measuring anything.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import starquant_plugin  # noqa: F401  (registers the model families and the modifiers)
from starquant_plugin.assets import SHIPPED_MODEL
from starquant_plugin.compress.quantize import quantize
from starquant_plugin.diffusion import masked_state
from starquant_plugin.evaluation import core_generate_fn, default_sampling, evaluate_examples, load_tasks
from starquant_plugin.evaluation.drift import late_step_mean, mean_masked_nll, trajectory_drift
from starquant_plugin import load as load_checkpoint
from starquant_plugin.models import family_of
from starquant_plugin.quantization.mappings import sgat_sites

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
BITS = ("w8a8", "w4a8", "w4a4")


def recipe_table() -> dict[str, Path]:
    table = {}
    for bits in BITS:
        table[f"starquant_{bits}"] = RECIPES / f"starquant_{bits}.yaml"
        for baseline in ("rtn", "gptq", "smoothquant", "rotation"):
            table[f"{baseline}_{bits}"] = RECIPES / "baselines" / f"{baseline}_{bits}.yaml"
    for path in sorted((RECIPES / "ablations").glob("*.yaml")):
        table[path.stem] = path
    return table


def activation_ranges(model, tokenizer, examples, mask_token_id):
    """Per layer, mean per-token absmax of the attention input (the normed input of q/k/v) by state."""
    ranges = {"masked": [], "unmasked": []}
    captured = []
    handles = [
        sgat_sites(block, model.config)["attention_input"].linears[0].register_forward_pre_hook(
            lambda m, args: captured.append(args[0]))
        for block in family_of(model.config).block_list(model)
    ]
    ids = tokenizer([e.prompt + e.answer for e in examples], return_tensors="pt", padding=True)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    noisy = ids.masked_fill(torch.rand(ids.shape, generator=generator) < 0.5, mask_token_id)
    noisy[:, :3] = ids[:, :3]
    with torch.no_grad():
        model(noisy)
    for handle in handles:
        handle.remove()
    states = masked_state(noisy, mask_token_id)
    for output in captured:
        absmax = output.abs().amax(-1)
        ranges["masked"].append(float(absmax[states].mean()))
        ranges["unmasked"].append(float(absmax[~states].mean()))
    return ranges


def model_name(path: Path) -> str:
    """The checkpoint directory's name, which names the model in the figures (`llada-tiny-arith`, ...)."""
    return path.resolve().name


def plot(results: dict, ranges: dict, figures: Path, model: str, drift_prompts: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figures.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    layers = range(len(ranges["masked"]))
    ax.plot(layers, ranges["masked"], "o-", label="masked tokens")
    ax.plot(layers, ranges["unmasked"], "s-", label="unmasked tokens")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (block index, 0 = first)")
    ax.set_ylabel("mean per-token absmax of the\nattention input (activation value)")
    ax.set_title(f"{model}: activation range by token state (full precision)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "activation_ranges.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    curves = (("starquant_w4a4", "STaR-Quant (SGAT + TAC)", "C0", "-"), ("starquant_w4a4_notac", "SGAT only", "C0", "--"),
              ("gptq_w4a4_tac", "GPTQ + TAC", "C1", "-"), ("gptq_w4a4", "GPTQ only", "C1", "--"))
    for name, label, color, style in curves:
        if name in results and "drift" in results[name]:
            drift = results[name]["drift"]
            steps = range(1, len(drift["kl"]) + 1)
            axes[0].plot(steps, drift["kl"], style, marker="o", markersize=3, color=color, label=label)
            axes[1].plot(steps, [100 * v for v in drift["flipped"]], style, marker="o", markersize=3, color=color, label=label)
    axes[0].set_yscale("log")
    axes[0].set_title("KL(FP || quantized) at the masked positions", fontsize=10)
    axes[0].set_ylabel("mean KL per masked position (nats, log scale)")
    axes[1].set_title("committed tokens that differ from FP's final output", fontsize=10)
    axes[1].set_ylabel("share of committed tokens (%)")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("denoising step (1 = first)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{model}: W4A4 drift from full precision per denoising step ({drift_prompts} prompts)", fontsize=11)
    fig.tight_layout()
    fig.savefig(figures / "drift_w4a4.png", dpi=120)
    plt.close(fig)
    return ["figures/activation_ranges.png", "figures/drift_w4a4.png"]


def figure_markdown(figures: list[str], model: str, command: str, drift_prompts: int) -> list[str]:
    """Each figure as an image line and an italic caption line naming the model, what is plotted and the command."""
    described = {
        "figures/activation_ranges.png": (
            f"Activation range per layer by token state, {model}",
            f"`{model}` in full precision: per layer, the mean over tokens of each token's absolute maximum at "
            "the attention input (the normed input of q/k/v), for masked and unmasked tokens; 64 held-out "
            "examples, each token after the first three replaced by the mask token with probability 0.5.",
        ),
        "figures/drift_w4a4.png": (
            f"W4A4 drift per denoising step, {model}",
            f"`{model}`, W4A4 with and without TAC (STaR-Quant, GPTQ): per denoising step, mean KL(FP || quantized) "
            "at the masked positions (left, log scale) and the share of committed tokens that differ from the "
            f"full-precision model's final output (right); {drift_prompts} held-out prompts, the quantized model's own "
            "greedy decode.",
        ),
    }
    lines = []
    for number, figure in enumerate(figures, 1):
        alt, caption = described[figure]
        lines += [f"![{alt}]({figure})", "",
                  f"*Figure {number}. {caption} Measured by `.venv/compress/bin/python {command}`; "
                  "`--plots-only` redraws it from results.json.*", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--limit", type=int, default=500, help="evaluation examples")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32"],
                        help="evaluation dtype (float32: bf16 checkpoints on CPUs without bf16 units)")
    parser.add_argument("--nll-examples", type=int, default=40)
    parser.add_argument("--drift-prompts", type=int, default=500, help="prompts of the drift measure (64 was too noisy to order TAC variants)")
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all); the other rows are kept from --docs/results.json")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "compare")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--plots-only", action="store_true",
                        help="redraw the figures under --docs/figures from --docs/results.json; measures and writes nothing else")
    args = parser.parse_args()
    if args.plots_only:
        stored = json.loads((args.docs / "results.json").read_text())
        for figure in plot(stored["results"], stored["activation_ranges"], args.docs / "figures", model_name(args.model), args.drift_prompts):
            print(args.docs / figure)
        return
    torch.manual_seed(0)

    examples = load_tasks(args.model / "eval.jsonl")[: args.limit]
    reference, tokenizer = load_checkpoint(args.model, dtype=args.dtype)
    mask = reference.config.mask_token_id
    sampling = default_sampling(tokenizer, examples)
    results = {}

    def measure(name, model, extra):
        started = time.perf_counter()
        scored = evaluate_examples(
            core_generate_fn(model, tokenizer, mask), examples, sampling, batch_size=100, progress=False
        )
        row = {
            "exact_match": scored.exact_match,
            "per_task": scored.per_task,
            "masked_nll": mean_masked_nll(model, tokenizer, examples[: args.nll_examples], mask),
            **extra,
        }
        if "w4a4" in name:
            row["drift"] = trajectory_drift(model, reference, tokenizer, [e.prompt for e in examples[: args.drift_prompts]], sampling, mask)
        row["eval_seconds"] = round(time.perf_counter() - started, 1)
        results[name] = row
        print(f"{name:32s} EM {row['exact_match'] * 100:6.2f}  NLL {row['masked_nll']:.4f}", flush=True)

    measure("fp", reference, {"quantize_seconds": 0.0})
    for name, recipe in recipe_table().items():
        if args.only and name not in args.only:
            continue
        output = args.work / name
        summary = quantize(args.model, recipe, output, overwrite=True)
        model, _ = load_checkpoint(output, dtype=args.dtype)
        measure(name, model, {"quantize_seconds": summary["seconds"], "recipe": str(recipe.relative_to(ROOT))})

    previous = args.docs / "results.json"
    if args.only and previous.is_file():  # rerun some recipes: keep the other rows of the last full run
        kept = json.loads(previous.read_text())["results"]
        results = {name: results.get(name, row) for name, row in kept.items()} | results
    ranges = activation_ranges(reference, tokenizer, examples[:64], mask)
    figures = plot(results, ranges, args.docs / "figures", model_name(args.model), args.drift_prompts)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    (args.docs / "results.json").write_text(json.dumps({"machine": machine, "activation_ranges": ranges, "results": results}, indent=1))
    write_markdown(args, results, figures, machine)


def describe_model(path: Path) -> str:
    """One line from the checkpoint's own files: family, shapes, heads, dtype, shards, special-token ids."""
    from starquant_plugin.checkpoint import validate_checkpoint

    config = json.loads((path / "config.json").read_text())
    model_config = validate_checkpoint(path, with_tokenizer=False).model_config
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    return (
        f"{config['model_type']} format; hidden {model_config.hidden_size}, {model_config.num_hidden_layers} layers, "
        f"{model_config.num_attention_heads} heads / {model_config.num_key_value_heads} KV heads, MLP "
        f"{model_config.intermediate_size}, vocab {config['vocab_size']} (mask id {config['mask_token_id']}, EOS "
        f"{config['eos_token_id']}), {config.get('torch_dtype') or config.get('dtype')} weights in {len(shards)} "
        "safetensors file(s)"
    )


READING = "## Reading"


def write_markdown(args, results, figures, machine) -> None:
    fp = results["fp"]["exact_match"]
    shipped = args.model.resolve() == SHIPPED_MODEL.resolve()
    command = f"examples/compare.py --limit {args.limit}"
    if not shipped:
        command += f" --model {args.model} --docs {args.docs} --work {args.work}"
    if args.dtype != "auto":
        command += f" --dtype {args.dtype}"
    tasks = sorted({task for row in results.values() for task in row["per_task"]})
    lines = [
        "# Results on the shipped model" if shipped else f"# Results on `{args.model.name}`",
        "",
        *([] if shipped else [f"Model: {describe_model(args.model)}.", ""]),
        f"Measured by `.venv/compress/bin/python {command}` "
        f"({len(results) - 1} recipes; {machine['threads']} torch threads on {machine['cpu']}). "
        "Exact match on the held-out set (greedy, gen_length = steps = block = longest answer); masked NLL: "
        f"Monte-Carlo ELBO, 32 samples, nats per answer, first {args.nll_examples} examples. Quantized models are "
        "evaluated as fake-quant after reloading the written checkpoint (`starquant eval DIR`).",
        *(["", f"Re-measured with `--only {' '.join(args.only)}`; the other rows are from the previous run "
               "of this command (kept in results.json)."] if args.only else []),
        "",
        f"| recipe | exact match (%) | Δ vs FP | {' | '.join(tasks)} | masked NLL | quantize (s) |",
        "| --- | ---: | ---: | " + "---: | " * len(tasks) + "---: | ---: |",
    ]
    for name, row in results.items():
        per_task = " | ".join(f"{row['per_task'].get(task, 0) * 100:.1f}" for task in tasks)
        lines.append(
            f"| {name} | {row['exact_match'] * 100:.2f} | {(row['exact_match'] - fp) * 100:+.2f} | {per_task} | "
            f"{row['masked_nll']:.4f} | {row['quantize_seconds']} |"
        )
    lines += ["", f"Drift (per denoising step, W4A4, {args.drift_prompts} prompts; KL at masked positions / fraction of committed tokens that differ from FP):", ""]
    lines += ["| recipe | late-step KL | last-step flipped | KL per step | flipped per step |", "| --- | ---: | ---: | --- | --- |"]
    for name, row in results.items():
        if "drift" in row:
            kl, flipped = row["drift"]["kl"], row["drift"]["flipped"]
            lines.append(
                f"| {name} | {late_step_mean(kl):.4f} | {flipped[-1]:.4f} | {', '.join(f'{v:.4f}' for v in kl)} | "
                f"{', '.join(f'{v:.4f}' for v in flipped)} |"
            )
    lines += ["", *figure_markdown(figures, model_name(args.model), command, args.drift_prompts)]
    target = args.docs / "results.md"
    # The hand-written sections after the generated part (from "## Reading" on) are kept.
    previous = target.read_text() if target.is_file() else ""
    kept = previous[previous.index(READING):] if READING in previous else ""
    target.write_text("\n".join(lines) + "\n" + kept)


if __name__ == "__main__":
    main()
