"""Where does TAC help or hurt a quantized checkpoint? Three measurements against the FP model.

    .venv/compress/bin/python examples/diagnose_tac.py layers CKPT [--model FP] [--prompts N]
    .venv/compress/bin/python examples/diagnose_tac.py oracle CKPT --layer L [--model FP] [--prompts N]
    .venv/compress/bin/python examples/diagnose_tac.py paired CKPT_A CKPT_B [--model FP] [--prompts N]

- `layers`: mean masked-position KL(FP || Q) on the canvases of the FP model's own decodes of
  N evaluation prompts (the same canvases for every variant), with every TAC map, with none,
  and with each layer's map alone (the others set to the identity).
- `oracle`: with CKPT as it is, replace one activation of layer L by the FP model's on the same
  canvas (attention output = o-projection input, o-projection output, residual after the
  attention, block output) and report the KL: which stage's error the output is sensitive to.
- `paired`: per prompt, the late-step drift (mean KL over the second half of the steps, the
  quantized model's own trajectory) of two checkpoints; the mean difference A - B with a paired
  bootstrap 95% interval, its median, and how much of it the worst prompts carry.

Prompts are spread evenly over the model's `eval.jsonl`. Used for docs/llada-gqa-6d/results.md
("Why TAC raised the drift here").
"""

import argparse
from pathlib import Path

import torch

import starquant_plugin  # noqa: F401  (registers LLaDA)
from starquant_plugin.assets import SHIPPED_MODEL
from starquant_plugin.data import trajectory_canvases
from starquant_plugin.diffusion import hf_logits_fn
from starquant_plugin.evaluation import default_sampling, load_tasks
from starquant_plugin.evaluation.drift import late_step_mean, masked_position_kl, trajectory_drift
from starquant_plugin.models import load_llada
from starquant_plugin.quantization import TACMap, shrink_tac
from starquant_plugin.quantization.mappings import tac_target


def spread(items: list, count: int) -> list:
    picked = torch.linspace(0, len(items) - 1, min(count, len(items))).round().long().tolist()
    return [items[i] for i in picked]


def fp_canvases(fp, tokenizer, examples) -> list[torch.Tensor]:
    """Every step's canvas of the FP model decoding each prompt (answer length = the reference's)."""
    mask = fp.config.mask_token_id
    rows = [
        torch.tensor(tokenizer(e.prompt)["input_ids"] + [mask] * len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]))
        for e in examples
    ]
    return trajectory_canvases(hf_logits_fn(fp), rows, mask)


@torch.no_grad()
def mean_kl(quantized, canvases, reference_logits, mask_token_id: int) -> float:
    values = [masked_position_kl(ref, quantized(input_ids=c).logits, c == mask_token_id) for c, ref in zip(canvases, reference_logits)]
    return float(torch.cat(values).mean())


def layers(args, fp, tokenizer, examples) -> None:
    quantized, _ = load_llada(args.checkpoints[0], args.dtype)
    targets = [tac_target(block, quantized.config) for block in quantized.model.transformer.blocks]
    if not all(hasattr(t, "tac_matrices") for t in targets):
        raise SystemExit(f"{args.checkpoints[0]}: not every layer has TAC maps")
    saved = [TACMap(t.tac_matrices.clone(), t.tac_offsets.clone()) for t in targets]
    canvases = fp_canvases(fp, tokenizer, examples)
    with torch.no_grad():
        reference = [fp(input_ids=c).logits for c in canvases]
    mask = fp.config.mask_token_id

    def use(keep) -> None:
        for index, (target, fitted) in enumerate(zip(targets, saved)):
            tac = shrink_tac(fitted, 1.0 if keep(index) else 0.0)  # strength 0: the identity
            target.tac_matrices.copy_(tac.matrices)
            target.tac_offsets.copy_(tac.offsets)

    print(f"{len(canvases)} canvases of {len(examples)} prompts; mean masked-position KL(FP || Q):")
    for name, keep in [("every map", lambda i: True), ("no map (TAC off)", lambda i: False)] + [
        (f"layer {j} only", lambda i, j=j: i == j) for j in range(len(targets))
    ]:
        use(keep)
        print(f"  {name:18s} {mean_kl(quantized, canvases, reference, mask):.4f}", flush=True)


def _capture(model, module, canvases, output: bool) -> list[torch.Tensor]:
    rows = []
    if output:
        handle = module.register_forward_hook(lambda m, a, o: rows.append((o[0] if isinstance(o, tuple) else o).clone()))
    else:
        handle = module.register_forward_pre_hook(lambda m, a: rows.append(a[0].clone()), prepend=True)
    with torch.no_grad():
        for canvas in canvases:
            model(input_ids=canvas)
    handle.remove()
    return rows


def oracle(args, fp, tokenizer, examples) -> None:
    quantized, _ = load_llada(args.checkpoints[0], args.dtype)
    canvases = fp_canvases(fp, tokenizer, examples)
    with torch.no_grad():
        reference = [fp(input_ids=c).logits for c in canvases]
    mask = fp.config.mask_token_id
    q_block, fp_block = quantized.model.transformer.blocks[args.layer], fp.model.transformer.blocks[args.layer]
    points = [("o-projection output", lambda b: b.attn_out, True), ("residual after attention", lambda b: b.ff_norm, False),
              ("block output", lambda b: b, True)]
    if quantized.config.n_kv_heads != quantized.config.n_heads:
        # Without GQA the site's smoothing is folded into v_proj, so the raw inputs differ by it.
        points.insert(0, ("attention output", lambda b: b.attn_out, False))
    print(f"{len(canvases)} canvases of {len(examples)} prompts; KL(FP || Q) with CKPT as is: "
          f"{mean_kl(quantized, canvases, reference, mask):.4f}")
    for name, module_of, output in points:
        replacement = iter(_capture(fp, module_of(fp_block), canvases, output))
        module = module_of(q_block)
        if output:
            handle = module.register_forward_hook(lambda m, a, o: next(replacement) if not isinstance(o, tuple) else (next(replacement), *o[1:]))
        else:
            handle = module.register_forward_pre_hook(lambda m, a: (next(replacement), *a[1:]), prepend=True)
        print(f"  FP {name} at layer {args.layer}: {mean_kl(quantized, canvases, reference, mask):.4f}", flush=True)
        handle.remove()


def paired(args, fp, tokenizer, examples) -> None:
    if len(args.checkpoints) != 2:
        raise SystemExit("paired needs two checkpoints")
    sampling = default_sampling(tokenizer, examples)
    late = {}
    for checkpoint in args.checkpoints:
        quantized, _ = load_llada(checkpoint, args.dtype)
        values = []
        for example in examples:
            kl = trajectory_drift(quantized, fp, tokenizer, [example.prompt], sampling, fp.config.mask_token_id)["kl"]
            values.append(late_step_mean(kl))
        late[checkpoint] = torch.tensor(values, dtype=torch.float64)
        print(f"{checkpoint}: late-step KL mean {float(late[checkpoint].mean()):.4f} median {float(late[checkpoint].median()):.2e}", flush=True)
    a, b = (late[c] for c in args.checkpoints)
    difference = a - b
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(0, len(difference), (2000, len(difference)), generator=generator)
    boot = difference[draws].mean(1)
    print(f"A - B over {len(difference)} prompts: mean {float(difference.mean()):+.4f}, 95% interval "
          f"[{float(boot.quantile(0.025)):+.4f}, {float(boot.quantile(0.975)):+.4f}], median {float(difference.median()):+.2e}")
    share = difference.abs().sort(descending=True).values.cumsum(0) / difference.abs().sum()
    print("share of sum |A - B| from the worst " + ", ".join(f"{k}: {float(share[k - 1]):.2f}" for k in (1, 5, 10) if k <= len(share)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["layers", "oracle", "paired"])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="the full-precision model (its eval.jsonl gives the prompts)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    fp, tokenizer = load_llada(args.model, args.dtype)
    examples = spread(load_tasks(args.model / "eval.jsonl"), args.prompts)
    {"layers": layers, "oracle": oracle, "paired": paired}[args.command](args, fp, tokenizer, examples)


if __name__ == "__main__":
    main()
