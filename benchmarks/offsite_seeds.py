"""The five offsite-tuning settings over several seeds, on one exported emulator: mean ± std.

One seed of 200 test examples leaves about ±7 points of noise on each accuracy, which hides every difference the
papers' targets are about. This reruns the data owner's side (task split, adapter tuning on the emulator, plug-in)
and the full-model baselines for each seed on the same emulator artifact, and aggregates. The owner's side (stage 1,
emulator generation) runs once, e.g. ``make train``, and is not repeated.

Run::

    HF_HUB_OFFLINE=1 python benchmarks/offsite_seeds.py --emulator-dir runs/default/emulator --seeds 0 1 2 \
        --out runs/offsite_seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from privtune.emulator import read_plan
from privtune.modules.offsite_pipeline import PipelineSettings, run_data_owner_and_evaluation

SETTINGS = ("full_zs", "emulator_zs", "ft", "emulator_ft", "plug_in")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emulator-dir", required=True, help="an emulator artifact (from EmulatorExport)")
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
    if not (Path(args.emulator_dir) / "emulator_plan.json").is_file():
        parser.error(f"--emulator-dir={args.emulator_dir!r} is not an emulator artifact (no emulator_plan.json)")
    if len(set(args.seeds)) < 2:
        parser.error(f"--seeds={args.seeds}: give at least two different seeds")
    model = read_plan(args.emulator_dir).base_model

    out = Path(args.out)
    per_seed: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        settings = PipelineSettings(
            output_dir=str(out / f"seed{seed}"), task=args.task, train_size=args.train_size, val_size=args.val_size,
            test_size=args.test_size, max_length=args.max_length, batch_size=args.batch_size, max_steps=args.steps,
            lr=args.lr, seed=seed,
        )  # fmt: skip
        report = run_data_owner_and_evaluation(settings, model, args.emulator_dir)
        row = {name: 100 * report["settings"][name]["acc"] for name in SETTINGS}
        row["gap"] = row["plug_in"] - row["emulator_ft"]
        per_seed[seed] = row
        print(f"seed {seed}: " + json.dumps(row), flush=True)

    summary = {
        name: {"mean": statistics.mean(r[name] for r in per_seed.values()),
               "std": statistics.stdev(r[name] for r in per_seed.values())}
        for name in (*SETTINGS, "gap")
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(
        json.dumps({"args": vars(args), "per_seed": per_seed, "summary": summary}, indent=2)
    )
    header = "| seeds | " + " | ".join(SETTINGS) + " | gap |"
    lines = [header, "|" + "---|" * (len(SETTINGS) + 2)]
    for seed, row in per_seed.items():
        lines.append(f"| {seed} | " + " | ".join(f"{row[k]:.1f}" for k in (*SETTINGS, "gap")) + " |")
    stats = " | ".join(f"{summary[k]['mean']:.1f} ± {summary[k]['std']:.1f}" for k in (*SETTINGS, "gap"))
    lines.append(f"| mean ± std | {stats} |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
