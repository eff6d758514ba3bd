"""Where does TAC help or hurt a quantized checkpoint? Four measurements against the FP model.

    .venv/compress/bin/python examples/diagnose_tac.py layers CKPT [--model FP] [--prompts N]
    .venv/compress/bin/python examples/diagnose_tac.py oracle CKPT --layer L|all [--model FP] [--prompts N]
    .venv/compress/bin/python examples/diagnose_tac.py paired CKPT_A CKPT_B [--model FP] [--prompts N]
    .venv/compress/bin/python examples/diagnose_tac.py explained CKPT [--model FP] [--prompts N] [--ridge R]

- `layers`: mean masked-position KL(FP || Q) on the canvases of the FP model's own decodes of
  N evaluation prompts (the same canvases for every variant), with every TAC map, with none,
  and with each layer's map alone (the others set to the identity).
- `oracle`: with CKPT as it is, replace one activation of layer L (or of every layer at once:
  `--layer all`) by the FP model's on the same canvas (attention output = o-projection input,
  o-projection output, residual after the attention, block output) and report the KL: which
  stage's error the output is sensitive to. "FP attention output at every layer" is the drift a
  perfect TAC map (docs/method.md's target) would leave. Also printed: how much of the KL the worst
  masked positions carry.
- `paired`: per prompt, the late-step drift (mean KL over the second half of the steps, the
  quantized model's own trajectory) of two checkpoints; the mean difference A - B with a paired
  bootstrap 95% interval, its median, and how much of it the worst prompts carry.
- `explained`: per layer, the share of CKPT's attention-output error (vs FP) that a TAC map
  fitted on half of the FP canvases removes on the other half: how much of it is affine per head.

Prompts are spread evenly over the model's `eval.jsonl`. Used for docs/llada-gqa-6d/results.md
("Why TAC raised the drift here"; "Where the drift after SGAT comes from").
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
from starquant_plugin import load as load_checkpoint
from starquant_plugin.models import family_of
from starquant_plugin.quantization import TACMap, apply_tac, fit_tac, shrink_tac
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
def position_kl(quantized, canvases, reference_logits, mask_token_id: int) -> torch.Tensor:
    """KL(FP || Q) at every masked position of every canvas, flat."""
    return torch.cat([masked_position_kl(ref, quantized(input_ids=c).logits, c == mask_token_id) for c, ref in zip(canvases, reference_logits)])


def mean_kl(quantized, canvases, reference_logits, mask_token_id: int) -> float:
    return float(position_kl(quantized, canvases, reference_logits, mask_token_id).mean())


def _flat(captured: list[torch.Tensor]) -> torch.Tensor:
    """Per-canvas captures [1, seq, width] as rows [tokens, width]."""
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in captured])


def layers(args, fp, tokenizer, examples) -> None:
    quantized, _ = load_checkpoint(args.checkpoints[0], args.dtype)
    targets = [tac_target(block, quantized.config) for block in family_of(quantized.config).block_list(quantized)]
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


def _in_folded_space(full: list[torch.Tensor], quantized: list[torch.Tensor]) -> list[torch.Tensor]:
    """Without GQA SGAT folds the attention-output site's smoothing D into v_proj's rows, so the
    quantized model's raw attention output is the FP one times D (up to quantization error); D is
    not stored in the checkpoint, so it is estimated per channel by least squares."""
    f, q = _flat(full), _flat(quantized)
    scale = (f * q).sum(0) / f.pow(2).sum(0).clamp(min=1e-30)
    return [x * scale for x in full]


def oracle(args, fp, tokenizer, examples) -> None:
    quantized, _ = load_checkpoint(args.checkpoints[0], args.dtype)
    canvases = fp_canvases(fp, tokenizer, examples)
    with torch.no_grad():
        reference = [fp(input_ids=c).logits for c in canvases]
    mask = fp.config.mask_token_id
    indices = range(len(family_of(fp.config).block_list(fp))) if args.layer == "all" else [args.layer]
    # (name, module, its output (else its input), only at the masked positions)
    points = [("attention output", lambda b: tac_target(b, fp.config), False, False), ("o-projection output", lambda b: tac_target(b, fp.config), True, False),
              ("o-projection output at masked positions only", lambda b: tac_target(b, fp.config), True, True),
              ("residual after attention", lambda b: b.ff_norm, False, False), ("block output", lambda b: b, True, False)]
    values = position_kl(quantized, canvases, reference, mask)
    top = values.sort(descending=True).values.cumsum(0) / values.sum()
    print(f"{len(canvases)} canvases of {len(examples)} prompts; KL(FP || Q) with CKPT as is: {float(values.mean()):.4f} "
          f"over {len(values)} masked positions; the top 0.1% / 1% / 10% of them carry "
          + " / ".join(f"{float(top[max(1, int(len(values) * f)) - 1]):.0%}" for f in (0.001, 0.01, 0.1)))
    for name, module_of, output, masked_only in points:
        wanted = {index: _capture(fp, module_of(family_of(fp.config).block_list(fp)[index]), canvases, output) for index in indices}
        if name == "attention output" and quantized.config.num_key_value_heads == quantized.config.num_attention_heads:
            wanted = {index: _in_folded_space(rows, _capture(quantized, module_of(family_of(quantized.config).block_list(quantized)[index]), canvases, False))
                      for index, rows in wanted.items()}
        handles = []
        for index in indices:
            replacement = iter(zip(wanted[index], canvases))
            module = module_of(family_of(quantized.config).block_list(quantized)[index])
            if output:
                def hook(m, a, o, r=replacement, masked_only=masked_only):
                    full, canvas = next(r)
                    value = o[0] if isinstance(o, tuple) else o
                    value = torch.where((canvas == mask).unsqueeze(-1), full, value) if masked_only else full
                    return (value, *o[1:]) if isinstance(o, tuple) else value
                handles.append(module.register_forward_hook(hook))
            else:
                handles.append(module.register_forward_pre_hook(lambda m, a, r=replacement: (next(r)[0], *a[1:]), prepend=True))
        where = "every layer" if args.layer == "all" else f"layer {args.layer}"
        print(f"  FP {name} at {where}: {mean_kl(quantized, canvases, reference, mask):.4f}", flush=True)
        for handle in handles:
            handle.remove()


def explained(args, fp, tokenizer, examples) -> None:
    """Per layer: how much of the quantized model's attention-output error a TAC map fitted on
    half of the canvases removes on the other half (fit_tac, one bucket, block head_dim)."""
    quantized, _ = load_checkpoint(args.checkpoints[0], args.dtype)
    canvases = fp_canvases(fp, tokenizer, examples)
    fit, test = canvases[::2], canvases[1::2]
    block = fp.config.head_dim
    print(f"{len(fit)} fitting / {len(test)} test canvases of {len(examples)} prompts; relative squared error of the "
          f"attention output, test canvases (ridge {args.ridge}):")
    for index, (q_block, fp_block) in enumerate(zip(family_of(quantized.config).block_list(quantized), family_of(fp.config).block_list(fp))):
        rows = {}
        for name, part in (("fit", fit), ("test", test)):
            q_rows = _capture(quantized, q_block.attn_out, part, False)
            fp_rows = _capture(fp, fp_block.attn_out, part, False)
            if quantized.config.num_key_value_heads == quantized.config.num_attention_heads:
                fp_rows = _in_folded_space(fp_rows, q_rows)
            rows[name] = [_flat(q_rows), _flat(fp_rows)]
        tac = fit_tac(*rows["fit"], block, args.ridge)
        q_test, fp_test = rows["test"]
        before = float((q_test - fp_test).pow(2).sum() / fp_test.pow(2).sum())
        after = float((apply_tac(q_test, tac) - fp_test).pow(2).sum() / fp_test.pow(2).sum())
        print(f"  layer {index}: {before:.3e} without the map, {after:.3e} with it ({1 - after / before:+.0%} removed)", flush=True)


def paired(args, fp, tokenizer, examples) -> None:
    if len(args.checkpoints) != 2:
        raise SystemExit("paired needs two checkpoints")
    sampling = default_sampling(tokenizer, examples)
    late = {}
    for checkpoint in args.checkpoints:
        quantized, _ = load_checkpoint(checkpoint, args.dtype)
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
    parser.add_argument("command", choices=["layers", "oracle", "paired", "explained"])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="the full-precision model (its eval.jsonl gives the prompts)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--layer", default="0", help="a layer index, or `all` (oracle: every layer at once)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ridge", type=float, default=1e-2, help="explained: the ridge of the fitted map")
    args = parser.parse_args()
    if args.layer != "all":
        if not args.layer.lstrip("-").isdigit():
            parser.error(f"--layer must be a layer index or `all`, got {args.layer!r}")
        args.layer = int(args.layer)
    torch.manual_seed(0)
    fp, tokenizer = load_checkpoint(args.model, args.dtype)
    n_layers = len(family_of(fp.config).block_list(fp))
    if args.layer != "all" and not 0 <= args.layer < n_layers:
        parser.error(f"--layer {args.layer}: {args.model} has layers 0..{n_layers - 1}")
    examples = spread(load_tasks(args.model / "eval.jsonl"), args.prompts)
    {"layers": layers, "oracle": oracle, "paired": paired, "explained": explained}[args.command](args, fp, tokenizer, examples)


if __name__ == "__main__":
    main()
