"""What `starquant quantize` costs against depth: each recipe run on random-weight checkpoints of a
real model's shapes with 1, 2, 4, ... blocks, one after the other in one run, per-stage seconds and
peak memory read from each run's `quantize_report.json`, and the totals extrapolated to the model's
full depth.

    python examples/bench_quantize_cost.py --shape llada-8b --layers 1 2 4 8 \\
        --recipes starquant_w8a8.yaml baselines/gptq_w8a8.yaml --json results/quantize-cost.json

The first recipe is compared with the last (the baseline a user would otherwise run). Extrapolation:
least squares per stage of seconds on (1, L), except TAC's held-out check, whose layer i runs
min(D, L - i) blocks (D = the recipe's `validation_depth`): on (1, L, sum_i min(D, L - i)) with three
depths or more. Memory: the peak of each run; at full depth, the baseline's least-squares line on
(1, L) plus the largest amount by which the first recipe's peak exceeded the baseline's.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from starquant_plugin.assets import SHIPPED_CALIBRATION_SET
from starquant_plugin.bench.shapes import SHAPE_CONFIGS, base_checkpoint, full_depth

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def quantize(base: Path, recipe: Path, output: Path, num_samples: int, seed: int) -> dict:
    """One `starquant quantize` run: its stages (from quantize_report.json) and wall time."""
    command = [sys.executable, "-m", "starquant_plugin.cli", "quantize", str(base), "--recipe", str(recipe),
               "--output", str(output), "--dataset", str(SHIPPED_CALIBRATION_SET), "--num-samples", str(num_samples),
               "--seed", str(seed), "--overwrite"]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)
    seconds = time.perf_counter() - started
    stages = json.loads((output / "quantize_report.json").read_text())["stages"]
    shutil.rmtree(output)  # only the report is kept: checkpoints at these shapes are gigabytes
    return {"wall_seconds": round(seconds, 1), "stages": stages}


def checked_blocks(depth: int, window: int | None) -> int:
    """Blocks TAC's held-out check runs over all layers of a `depth`-block model (per candidate and canvas)."""
    return sum(min(window or depth, depth - i) for i in range(depth))


def extrapolate(depths: list[int], seconds: list[float], depth: int, window: int | None = None,
                validation: bool = False) -> float:
    """Least-squares fit of a stage's seconds against depth, evaluated at `depth` (see the module docstring)."""
    def basis(d: int) -> list[float]:
        return [1.0, float(d)] + ([float(checked_blocks(d, window))] if validation and len(depths) >= 3 else [])

    solution = torch.linalg.lstsq(torch.tensor([basis(d) for d in depths], dtype=torch.float64),
                                  torch.tensor(seconds, dtype=torch.float64)[:, None]).solution
    return float(torch.tensor(basis(depth), dtype=torch.float64) @ solution[:, 0])


def validation_depth(recipe: Path) -> int | None:
    """The recipe's TACModifier.validation_depth (its default when unset)."""
    import yaml

    from starquant_plugin.compress import TACModifier

    def find(node):
        if isinstance(node, dict):
            if "TACModifier" in node:
                return (node["TACModifier"] or {}).get("validation_depth", TACModifier.model_fields["validation_depth"].default)
            for value in node.values():
                found = find(value)
                if found != "absent":
                    return found
        return "absent"

    found = find(yaml.safe_load(recipe.read_text()))
    return None if found == "absent" else found


def summarize(runs: dict, recipes: dict[str, Path], depths: list[int], full: int) -> str:
    stage_names = list(dict.fromkeys(s["name"] for r in runs.values() for run in r.values() for s in run["stages"]))
    lines = []
    for depth in depths:
        lines += [f"### {depth} block{'s' * (depth > 1)}", "",
                  "| stage | " + " | ".join(f"{r} s / peak MiB" for r in recipes) + " |",
                  "| --- |" + " --- |" * len(recipes)]
        for name in stage_names:
            cells = []
            for recipe in recipes:
                stage = next((s for s in runs[recipe][str(depth)]["stages"] if s["name"] == name), None)
                cells.append("—" if stage is None else f"{stage['seconds']:.1f} / {stage['peak_memory_bytes'] / 2**20:,.0f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("| total (stages) | " + " | ".join(f"{_total(runs[r][str(depth)]):.1f}" for r in recipes) + " |")
        lines.append("")
    first, baseline = list(recipes)[0], list(recipes)[-1]
    lines += ["### Against depth", "", "| blocks | " + " | ".join(f"{r} s" for r in recipes) +
              f" | {first} / {baseline} time | peak memory ratio |", "| --- |" + " --- |" * (len(recipes) + 2)]
    for depth in depths:
        totals = [_total(runs[r][str(depth)]) for r in recipes]
        peaks = [_peak(runs[r][str(depth)]) for r in (first, baseline)]
        lines.append(f"| {depth} | " + " | ".join(f"{t:.1f}" for t in totals) +
                     f" | {totals[0] / totals[-1]:.2f}x | {peaks[0] / peaks[1]:.2f}x |")
    extrapolated = {}
    for recipe, path in recipes.items():
        window = validation_depth(path)
        extrapolated[recipe] = sum(
            max(extrapolate(depths, [next((s["seconds"] for s in runs[recipe][str(d)]["stages"] if s["name"] == name), 0.0)
                                     for d in depths], full, window, validation=name == "TAC validation"), 0.0)
            for name in stage_names)
    lines.append(f"| {full} (extrapolated) | " + " | ".join(f"{extrapolated[r]:.0f}" for r in recipes) + " | | |")
    totals = [extrapolated[r] for r in recipes]
    # Peak memory: the baseline's peak on (1, L) at full depth, plus the most the first recipe's peak
    # exceeded the baseline's at any measured depth (its extra does not scale with the weights).
    base_peak = extrapolate(depths, [_peak(runs[baseline][str(d)]) / 2**20 for d in depths], full)
    extra = max((_peak(runs[first][str(d)]) - _peak(runs[baseline][str(d)])) / 2**20 for d in depths)
    lines.append(f"| {full} (extrapolated), peak MiB | {base_peak + extra:,.0f} | " + " | ".join(
        f"{base_peak:,.0f}" for _ in list(recipes)[1:]) + " | | |")
    lines.append(f"\n{first} / {baseline} at {full} blocks (extrapolated): time {totals[0] / totals[-1]:.2f}x, "
                 f"peak memory {(base_peak + extra) / base_peak:.2f}x (the baseline's peak at full depth plus the "
                 f"largest extra measured, {extra:,.0f} MiB)")
    for low in dict.fromkeys(d for d in depths[:-1] if d in (depths[0], 2)):
        growth = [_total(runs[r][str(depths[-1])]) / _total(runs[r][str(low)]) for r in recipes]
        lines.append(f"time from {low} to {depths[-1]} blocks: " + ", ".join(f"{r} {g:.2f}x" for r, g in zip(recipes, growth)))
    return "\n".join(lines)


def _total(run: dict) -> float:
    return sum(s["seconds"] for s in run["stages"])


def _peak(run: dict) -> int:
    return max(s["peak_memory_bytes"] for s in run["stages"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llada-8b", choices=sorted(SHAPE_CONFIGS))
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--recipes", nargs="+", default=["starquant_w8a8.yaml", "baselines/gptq_w8a8.yaml"],
                        help="recipe files under recipes/ (or paths); the last is the baseline")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("results/quantize-cost"))
    parser.add_argument("--json", type=Path, help="also write the runs here (after each run)")
    parser.add_argument("--from-json", type=Path, help="summarize the runs of an earlier --json instead of running")
    args = parser.parse_args()
    depths = sorted(args.layers)
    recipes = {r: (RECIPES / r if (RECIPES / r).is_file() else Path(r)) for r in args.recipes}
    runs = json.loads(args.from_json.read_text())["runs"] if args.from_json else {r: {} for r in recipes}
    for depth in [] if args.from_json else depths:
        base = base_checkpoint(args.shape, depth, args.work_dir)
        for name, recipe in recipes.items():
            runs[name][str(depth)] = quantize(base, recipe, args.work_dir / f"{args.shape}-{depth}l" / "out",
                                              args.num_samples, args.seed)
            if args.json:  # what is measured so far survives an interrupted run
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"shape": args.shape, "num_samples": args.num_samples, "runs": runs}, indent=2))
        shutil.rmtree(base.parent)  # the random checkpoint of this depth
    full = full_depth(json.loads(SHAPE_CONFIGS[args.shape].read_text()))
    print(summarize(runs, recipes, depths, full))


if __name__ == "__main__":
    main()
