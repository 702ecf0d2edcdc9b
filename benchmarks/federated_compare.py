"""FedPepTAO against its baselines and controls on one setup: the same clients, rounds and local work per method.

Runs ``train.py fit`` once per method (and per seed) on a base config (configs/fed_prompt/), overriding only the server
optimizer, which layers' prefixes are federated and whether the others stay personal. The default arms separate
FedPepTAO's three ingredients (arXiv 2310.15080):

=====================================================  ==========================================================
arm                                                    isolates
=====================================================  ==========================================================
FedPepTAO (selected layers + personal layers)          the method
FedAvg, all layers                                     the usual baseline (twice the bytes)
FedAvg, FedPepTAO's layers, no personal layers         same bytes, no personalisation: the cost of the selection
FedAvg, FedPepTAO's layers + personal layers           same bytes, same personalisation: FedPepTAO's optimizer
FedAdam, all layers                                    an adaptive server optimizer without the selection
=====================================================  ==========================================================

Each run reports the personalised accuracy (each client's own prompt on its own evaluation data, FedPepTAO's
metric, which credits personal layers) and the global accuracy (the global prompt alone on the pooled evaluation
split), bytes and time. With ``--seeds`` every seed gets new client partitions, sampling and initialisation; the
summary gives mean ± std over seeds. A finished run (its ``report.json``) is reused with ``--resume``; ``--commit``
commits each run's report as it lands. The target accuracy for "rounds to target" is fixed on the command line before
the run and recorded in the summary.

Usage (the published tables; target fixed at 0.85 before running)::

    python benchmarks/federated_compare.py --config configs/fed_prompt/fedpeptao_code.yaml \\
        --out benchmarks/results/fedpeptao_controls_minilm_bbc --seeds 0 1 2 --target 0.85 --resume --commit
    python benchmarks/federated_compare.py --config configs/fed_prompt/smollm2_tweets_fedpeptao.yaml \\
        --out benchmarks/results/fedpeptao_controls_smollm2_tweets --seeds 0 1 2 --target 0.55 --resume --commit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# label -> (output folder, overrides of trainer.strategy.init_args.federated)
METHODS: dict[str, tuple[str, list[str]]] = {
    "FedPepTAO (selected + personal layers)": (
        "fedpeptao",
        ["server=privtune.federated.FedPepTAOServer", "layers=fedpeptao"],
    ),
    "FedAvg (all layers)": ("fedavg", ["server=privtune.federated.FedAvg", "layers=all"]),
    "FedAvg (FedPepTAO's layers, no personal layers)": (
        "fedavg_selected_frozen",
        ["server=privtune.federated.FedAvg", "layers=fedpeptao", "personal_layers=false"],
    ),
    "FedAvg (FedPepTAO's layers + personal layers)": (
        "fedavg_selected",
        ["server=privtune.federated.FedAvg", "layers=fedpeptao"],
    ),
    "FedAdam (all layers)": ("fedadam", ["server=privtune.federated.FedAdam", "layers=all"]),
    "FedProx mu=0.01 (all layers)": (
        "fedprox_mu_0_01",
        ["server=privtune.federated.FedAvg", "layers=all", "proximal_mu=0.01"],
    ),
    "SCAFFOLD (all layers)": ("scaffold", ["server=privtune.federated.Scaffold", "layers=all"]),
    "FedPepTAO clean preset (selected + personal layers)": (
        "fedpeptao_clean",
        ["server=privtune.federated.FedPepTAOServer", "server.init_args.preset=clean", "layers=fedpeptao"],
    ),
}
# FedPepTAO, its two same-bytes controls (with and without personal layers) and two all-layer baselines.
DEFAULT_METHODS = list(METHODS)[:5]
SUMMARY_KEYS = ("final_global_acc", "final_acc", "best_acc", "total_bytes", "wall_seconds")


def run_one(config: str, run_dir: Path, label: str, seed: int | None, extra: list[str]) -> dict[str, Any]:
    """One ``train.py fit`` of ``label`` into ``run_dir``; returns its report with label and wall time."""
    from train import main as train_main

    slug, method_overrides = METHODS[label]
    fed = "--trainer.strategy.init_args.federated."
    overrides = [f"{fed}{o}" for o in method_overrides]
    overrides += [
        f"{fed}report_dir={run_dir}",
        f"--trainer.default_root_dir={run_dir}",
        f"--data.init_args.partition_dir={run_dir}",
    ]
    if seed is not None:  # new partitions, sampling, dropout and initialisation per seed
        overrides += [f"--seed_everything={seed}", f"{fed}seed={seed}", f"--data.init_args.seed={seed}"]
    start = time.perf_counter()
    train_main(["fit", "--config", config, *overrides, *extra])
    report = json.loads((run_dir / "report.json").read_text())
    report["label"] = label
    report["seed"] = seed
    report["wall_seconds"] = time.perf_counter() - start
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise_seeds(per_seed: dict[int, list[dict[str, Any]]], target: float | None) -> list[dict[str, Any]]:
    """Mean ± std over seeds of each method's summary (and how many seeds reached ``target``)."""
    from privtune.federated.report import summarize

    rows: dict[str, dict[str, Any]] = {}
    for seed, runs in sorted(per_seed.items()):
        for run in runs:
            s = summarize(run, target) | {"wall_seconds": run.get("wall_seconds")}
            row = rows.setdefault(s["label"], {"label": s["label"], "seeds": [], "layers": s["num_selected_layers"]})
            row["seeds"].append(seed)
            for key in (*SUMMARY_KEYS, "rounds_to_target", "rounds_to_target_global"):
                row.setdefault(key + "_values", []).append(s[key])
    out = []
    for row in rows.values():
        for key in SUMMARY_KEYS:
            vals = [v for v in row[key + "_values"] if v is not None]
            row[key + "_mean"], row[key + "_std"] = _mean_std(vals) if vals else (None, None)
        for key in ("rounds_to_target", "rounds_to_target_global"):
            reached = [v for v in row[key + "_values"] if v is not None]
            row[key + "_reached"] = f"{len(reached)}/{len(row[key + '_values'])}"
        out.append(row)
    return out


def seeds_table(rows: list[dict[str, Any]], target: float | None) -> str:
    """The Markdown table of :func:`summarise_seeds`."""

    def pm(row: dict[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
        mean, std = row[key + "_mean"], row[key + "_std"]
        return "n/a" if mean is None else f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"

    t = "target" if target is None else f"{target:.2f}"
    lines = [
        f"| method | layers sent | global acc (%) | personalised acc (%) | best pers. acc (%) | seeds reaching {t} "
        "(global / pers.) | MB up+down | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['layers']} | {pm(r, 'final_global_acc')} | {pm(r, 'final_acc')} | "
            f"{pm(r, 'best_acc')} | {r['rounds_to_target_global_reached']} / {r['rounds_to_target_reached']} | "
            f"{r['total_bytes_mean'] / 1e6:.1f} | {pm(r, 'wall_seconds', 1.0, 0)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, default=None, help="accuracy for 'rounds to target' (fix it first)")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, help="method labels (see METHODS)")
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="one run per seed (new partitions)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs' report.json")
    parser.add_argument("--commit", action="store_true", help="git-commit each run's report as it lands")
    parser.add_argument(
        "--docs", nargs="*", default=[], help="Markdown files whose `<!-- fed-controls:<out name> -->` block to rewrite"
    )
    # any other argument (``--trainer.x=1``, ``--data.init_args.y=2``) is passed on to every train.py run
    args, extra = parser.parse_known_args()
    bad = [a for a in extra if not a.startswith(("--trainer.", "--model.", "--data.", "--seed_everything"))]
    if bad:
        hint = "train.py overrides start with --trainer., --model. or --data."
        parser.error(f"unrecognized arguments: {' '.join(bad)} ({hint})")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    if args.target is not None and not 0.0 < args.target <= 1.0:
        parser.error(f"--target must be an accuracy in (0, 1]; got {args.target}")

    from privtune.eval.provenance import commit_paths, run_provenance
    from privtune.federated.report import write_comparison

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds: list[int | None] = list(args.seeds) if args.seeds else [None]
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for seed in seeds:
        seed_dir = out if seed is None else out / f"seed{seed}"
        runs = []
        for label in args.methods:
            run_dir = seed_dir / METHODS[label][0]
            report_path = run_dir / "report.json"
            if args.resume and report_path.exists():
                report = json.loads(report_path.read_text())
                if report.get("label") == label:
                    runs.append(report)
                    continue
            report = run_one(args.config, run_dir, label, seed, extra)
            runs.append(report)
            print(f"seed {seed} {label}: {report['history'][-1]} ({report['wall_seconds']:.0f} s)", flush=True)
            if args.commit:
                commit_paths([str(report_path)], f"FedPepTAO controls: {out.name}, {label}, seed {seed}")
        table = write_comparison(seed_dir, runs, args.target, title=Path(args.config).stem)
        print(table, flush=True)
        per_seed[0 if seed is None else seed] = runs
    if args.seeds:
        rows = summarise_seeds(per_seed, args.target)
        summary = {"provenance": run_provenance(), "config": args.config, "target": args.target, "rows": rows}
        summary["seeds"] = args.seeds
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        md = (
            f"# {Path(args.config).stem}: FedPepTAO and its controls over seeds {args.seeds}\n\n"
            f"Mean ± std over seeds of the final round. Target {args.target} fixed before the run. "
            f"Command: `{summary['provenance']['command']}`, commit {summary['provenance']['commit']}, "
            f"{summary['provenance']['date_utc']}.\n\n" + seeds_table(rows, args.target)
        )
        (out / "summary.md").write_text(md)
        print(md)
        from privtune.eval.includes import replace_block

        body = md.split("\n", 1)[1].strip()  # without the title
        for doc in args.docs:
            rel = out.resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
            replace_block(doc, f"fed-controls:{out.name}", body, [f"{rel}/summary.md", f"{rel}/summary.json"])
        if args.commit:
            keep = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".md", ".png", ".yaml")]
            commit_paths([str(p) for p in keep], f"FedPepTAO controls: {out.name} summary over seeds {args.seeds}")


if __name__ == "__main__":
    main()
