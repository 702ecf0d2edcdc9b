"""The five offsite-tuning settings over several seeds, for one or more emulators side by side: mean ± std.

One seed of 200 test examples leaves about ±7 points of noise on each accuracy, which hides every difference the
papers' targets are about. For each seed this draws a new task split (train and test), measures full zero-shot and
full fine-tuning of the adapter blocks once, and then, for every emulator arm, the data owner's side (emulator
zero-shot, adapter tuning on the emulator, plug-in). Arms share the seed's split, so their differences are paired.
Every arm has Offsite-Tuning's 2 + 2 adapter blocks (0, 1, L-2, L-1), the blocks full fine-tuning tunes.
The owner's side (stage 1, emulator generation) runs once beforehand, e.g. ``make train``, and is not repeated.

Arms:

* ``--emulator NAME=DIR``: an exported emulator artifact (ScaleOT, OT + KD, GradOT), repeatable;
* ``--uniform-drop K``: Offsite-Tuning's undistilled 2-K-2 uniform layer drop, built in process (it holds original
  blocks, so it is never exported).

Run::

    HF_HUB_OFFLINE=1 python benchmarks/offsite_seeds.py --emulator scaleot=runs/default/emulator \
        --uniform-drop 13 --seeds 0 1 2 --test-size 400 --out runs/offsite_seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from privtune.emulator import read_plan
from privtune.eval.offsite_report import privacy_gap
from privtune.recipes.offsite import NestedTrainers, OffsiteRecipe, PipelineSettings, make_datamodule

ARM_SETTINGS = ("emulator_zs", "emulator_ft", "plug_in", "gap")


def _arms(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, tuple[str | None, int | None]]:
    """``{name: (emulator_dir, uniform_drop_layers)}``, checked before any work."""
    arms: dict[str, tuple[str | None, int | None]] = {}
    for spec in args.emulator:
        name, sep, folder = spec.partition("=")
        if not sep or not name:
            parser.error(f"--emulator={spec!r}: write NAME=DIR, e.g. scaleot=runs/default/emulator")
        if not (Path(folder) / "emulator_plan.json").is_file():
            parser.error(f"--emulator={spec!r}: {folder!r} is not an emulator artifact (no emulator_plan.json)")
        plan = read_plan(folder)
        if (plan.adapter_bottom, plan.adapter_top) != (2, 2):
            parser.error(f"--emulator={spec!r}: adapters {plan.adapter_bottom}+{plan.adapter_top}; the FT baseline "
                         "here tunes blocks 0, 1, L-2, L-1, so every arm needs 2+2 adapters")  # fmt: skip
        arms[name] = (folder, None)
    if args.uniform_drop is not None:
        if args.uniform_drop < 1:
            parser.error(f"--uniform-drop={args.uniform_drop}: give the number of kept middle blocks (>= 1)")
        arms[f"ot_drop_2-{args.uniform_drop}-2"] = (None, args.uniform_drop)
    if not arms:
        parser.error("give at least one arm: --emulator NAME=DIR and/or --uniform-drop K")
    if len(set(args.seeds)) < 2:
        parser.error(f"--seeds={args.seeds}: give at least two different seeds")
    return arms


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emulator", action="append", default=[], metavar="NAME=DIR", help="an emulator artifact")
    parser.add_argument("--uniform-drop", type=int, default=None, metavar="K", help="also OT's 2-K-2 layer drop")
    parser.add_argument("--model", default=None, help="base model (default: the first artifact's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", default="tweets")
    parser.add_argument("--train-size", type=int, default=240)
    parser.add_argument("--val-size", type=int, default=16)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="adapter-tuning steps")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--out", default="runs/offsite_seeds")
    args = parser.parse_args()
    arms = _arms(parser, args)
    folders = [folder for folder, _ in arms.values() if folder is not None]
    model = args.model or (read_plan(folders[0]).base_model if folders else "smollm2-135m-instruct")

    out = Path(args.out)
    per_seed: dict[int, dict] = {}
    for seed in args.seeds:
        settings = PipelineSettings(
            output_dir=str(out / f"seed{seed}"), task=args.task, train_size=args.train_size, val_size=args.val_size,
            test_size=args.test_size, max_length=args.max_length, batch_size=args.batch_size, max_steps=args.steps,
            lr=args.lr, seed=seed,
        )  # fmt: skip
        data = make_datamodule(settings, model)
        recipe = OffsiteRecipe(settings, NestedTrainers.auto(settings.output_dir))
        zs, ft, _ = recipe.full_model(model, data, [0, 1, -2, -1])
        row: dict = {"full_zs": 100 * zs["acc"], "ft": 100 * ft["acc"]}
        for name, (folder, layers) in arms.items():
            res = recipe.tune_emulator_and_plug_in(
                model, folder, str(out / f"seed{seed}" / name / "adapters"), data, layers, arm=name
            )
            accs = {k: 100 * res[k]["acc"] for k in ("emulator_zs", "emulator_ft", "plug_in")}
            row[name] = accs | {"gap": privacy_gap(res["plug_in"]["acc"], res["emulator_ft"]["acc"])}
        per_seed[seed] = row
        print(f"seed {seed}: " + json.dumps(row), flush=True)

    rows = list(per_seed.values())
    summary: dict = {name: _mean_std([r[name] for r in rows]) for name in ("full_zs", "ft")}
    for name in arms:
        summary[name] = {k: _mean_std([r[name][k] for r in rows]) for k in ARM_SETTINGS}
        summary[name]["plug_in_minus_ft"] = _mean_std([r[name]["plug_in"] - r["ft"] for r in rows])
        summary[name]["plug_in_minus_full_zs"] = _mean_std([r[name]["plug_in"] - r["full_zs"] for r in rows])
    out.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "per_seed": per_seed, "summary": summary}
    (out / "seeds.json").write_text(json.dumps(report, indent=2))

    def cell(stat: dict[str, float], signed: bool = False) -> str:
        return f"{stat['mean']:+.1f} ± {stat['std']:.1f}" if signed else f"{stat['mean']:.1f} ± {stat['std']:.1f}"

    n = len(args.seeds)
    lines = [
        f"Accuracy in %, mean ± std over seeds {args.seeds} ({args.test_size} test examples each): full zero-shot "
        f"{cell(summary['full_zs'])}, full fine-tuning of the same blocks {cell(summary['ft'])}.",
        "",
        f"| emulator (n = {n}) | emulator ZS | emulator FT | plug-in | Δ = plug-in − emulator FT | plug-in − FT | "
        "plug-in − full ZS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in arms:
        s = summary[name]
        lines.append(
            f"| {name} | {cell(s['emulator_zs'])} | {cell(s['emulator_ft'])} | {cell(s['plug_in'])} | "
            f"{cell(s['gap'], True)} | {cell(s['plug_in_minus_ft'], True)} | {cell(s['plug_in_minus_full_zs'], True)} |"
        )
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
