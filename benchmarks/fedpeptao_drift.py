"""Why FedPepTAO's server diverges at 100 clients: its server step against FedAvg's, per round, under variants.

FedPepTAO (Che et al., EMNLP 2023) corrects client drift on the server: per sampled client it forms the control
variate ``c_i+ = c_i - c + (w - w_i) / (K_i eta_l)`` and, in the released code, folds ``c - c_i+`` into one
momentum buffer chained across the cohort (``docs/federated.md``, spec section 7). With few local steps ``K_i``
the term ``(w - w_i) / (K_i eta_l)`` is large, and chained over a cohort of ``m`` clients it is added ``m`` times.
This benchmark measures that directly on the 100-client setting of ``benchmarks/federated_client_dp.py`` without
DP (MiniLM + BBC News, 100 Dirichlet(0.5) clients, 10 per round, about 15 articles and 4 local steps a client):

- ``code``: the released code's server (the ``code`` preset), as in the client-DP table;
- ``round_start``: the same, with the momentum taken once per round (``momentum_mode: round_start``), so the
  correction is averaged over the cohort instead of chained through it;
- ``cv_x4``: the same as ``code`` with ``cv_local_lr`` four times larger, i.e. the correction term of clients that
  took four times the steps, with nothing else changed;
- ``epochs8``: ``code`` with 8 local epochs instead of 2 (``K_i`` four times larger for real);
- ``clean``: the ``clean`` preset (FedAvgM-style ``g = D_t``, round-start momentum, fresh client optimizer);
- ``fedavg_selected``: FedAvg on FedPepTAO's layers with the same personal layers (no server correction).

Each round logs ``server/correction_over_fedavg`` (``|w_new - w_bar| / |w_bar - w|``: what the server adds to
FedAvg's step, relative to that step) and ``server/cos_step_fedavg`` (cosine of the server's step with FedAvg's).
A correction above 1 means the server's own term outweighs the clients' average.

Usage (resumable per run; ``--commit`` commits each run's report as it lands)::

    python benchmarks/fedpeptao_drift.py --seeds 0 --out benchmarks/results/fedpeptao_drift --commit
    python benchmarks/fedpeptao_drift.py --seeds 0 --summarise-only --docs docs/federated.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # the shared helper, also when loaded by path

from federated_runs import run_config, write_summary  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = "configs/fed_prompt/fedpeptao_client_dp.yaml"
_FEDPEPTAO = "privtune.federated.FedPepTAOServer"
VARIANTS: dict[str, dict[str, Any]] = {
    "code": {"server": {"class_path": _FEDPEPTAO, "init_args": {"preset": "code"}}},
    "round_start": {"server": {"class_path": _FEDPEPTAO, "init_args": {"options": {"momentum_mode": "round_start"}}}},
    "cv_x4": {"server": {"class_path": _FEDPEPTAO, "init_args": {"options": {"cv_local_lr": 0.16}}}},
    "epochs8": {"server": {"class_path": _FEDPEPTAO, "init_args": {"preset": "code"}}, "local_epochs": 8},
    "clean": {"server": {"class_path": _FEDPEPTAO, "init_args": {"preset": "clean"}}},
    "fedavg_selected": {"server": {"class_path": "privtune.federated.FedAvg"}},
}


def variant_config(base: dict[str, Any], variant: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """The base config without client DP, with FedPepTAO's layer choice, this variant's knobs, seed and folders."""
    cfg = copy.deepcopy(base)
    cfg["seed_everything"] = seed
    cfg["trainer"]["default_root_dir"] = str(run_dir)
    fed = cfg["trainer"]["strategy"]["init_args"]["federated"]
    fed.update(copy.deepcopy(VARIANTS[variant]))
    fed["layers"] = "fedpeptao"
    fed["client_dp"] = None
    fed["seed"] = seed
    fed["report_dir"] = str(run_dir)
    cfg["data"]["init_args"]["seed"] = seed
    cfg["data"]["init_args"]["partition_dir"] = str(run_dir)
    return cfg


def curve_of(report: dict[str, Any]) -> dict[str, Any]:
    """Per-round global accuracy, mean local steps and the server-step diagnostics of one run."""
    hist = report["history"]

    def series(key: str) -> list[float | None]:
        return [h.get(key) for h in hist]

    glob = [a for a in series("fed/global_acc") if a is not None]
    corr = [c for c in series("server/correction_over_fedavg") if c is not None]
    return {
        "global_acc": series("fed/global_acc"),
        "personalised_acc": series("fed/personalized_acc"),
        "mean_local_steps": series("clients/mean_local_steps"),
        "correction_over_fedavg": series("server/correction_over_fedavg"),
        "cos_step_fedavg": series("server/cos_step_fedavg"),
        "final_global_acc": glob[-1] if glob else None,
        "best_global_acc": max(glob) if glob else None,
        "median_correction_over_fedavg": statistics.median(corr) if corr else None,
        "wall_seconds": report.get("wall_seconds"),
    }


def summarise(out: Path, seeds: list[int], variants: list[str], base: str = BASE) -> str:
    """A table over the seeds present of each variant; writes summary.json / summary.md."""
    rows = []
    for variant in variants:
        curves = [
            curve_of(json.loads(p.read_text()))
            for s in seeds
            if (p := out / f"seed{s}" / variant / "report.json").exists()
        ]
        if not curves:
            continue

        def pm(key: str, curves: list[dict[str, Any]] = curves, scale: float = 100.0, digits: int = 1) -> str:
            vals = [c[key] for c in curves if c.get(key) is not None]
            if not vals:
                return "—"
            if len(vals) == 1:  # one seed: no spread to show
                return f"{scale * vals[0]:.{digits}f}"
            return f"{scale * statistics.fmean(vals):.{digits}f} ± {scale * statistics.stdev(vals):.{digits}f}"

        steps = [s for c in curves for s in c["mean_local_steps"] if s is not None]
        rows.append(
            {
                "variant": variant,
                "seeds": len(curves),
                "round1_global_acc": pm("round1", [{"round1": c["global_acc"][0]} for c in curves]),
                "best_global_acc": pm("best_global_acc"),
                "final_global_acc": pm("final_global_acc"),
                "median_correction_over_fedavg": pm("median_correction_over_fedavg", scale=1.0, digits=2),
                "mean_local_steps": statistics.fmean(steps) if steps else None,
                "curves": curves,
            }
        )
    lines = [
        "| variant | seeds | mean K_i | global acc round 1 (%) | best (%) | final (%) | "
        "median correction / FedAvg step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = "—" if r["mean_local_steps"] is None else f"{r['mean_local_steps']:.1f}"
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {k} | {r['round1_global_acc']} | {r['best_global_acc']} | "
            f"{r['final_global_acc']} | {r['median_correction_over_fedavg']} |"
        )
    table = "\n".join(lines) + "\n"
    write_summary(
        out, "FedPepTAO's server step at 100 clients (MiniLM + BBC News, no DP)",
        f"Base config `{base}` without client DP; mean ± std over seeds.", base, rows, table,
    )  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/fedpeptao_drift")
    parser.add_argument("--base", default=BASE, help="the federated base config (100 clients by default)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--commit", action="store_true", help="git-commit each run's report as it lands")
    parser.add_argument("--summarise-only", action="store_true", help="only rebuild summary.md from the runs")
    parser.add_argument("--docs", nargs="*", default=[], help="Markdown files with a fedpeptao-drift block")
    args = parser.parse_args()

    from privtune.eval.provenance import commit_paths

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / args.base).read_text())
    if not args.summarise_only:
        for seed in args.seeds:
            for variant in args.variants:
                run_dir = out / f"seed{seed}" / variant
                report_path = run_dir / "report.json"
                if report_path.exists():
                    continue
                report = run_config(
                    variant_config(base, variant, seed, run_dir), run_dir,
                    f"FedPepTAO drift: {variant}, seed {seed}" if args.commit else None,
                )  # fmt: skip
                print(f"seed {seed} {variant}: final {curve_of(report)['final_global_acc']}", flush=True)
    table = summarise(out, sorted(args.seeds), list(VARIANTS), args.base)
    print(table)
    if args.docs:
        from privtune.eval.includes import replace_block

        rel = out.resolve().relative_to(ROOT).as_posix()
        body = (out / "summary.md").read_text().split("\n", 1)[1].strip()
        for doc in args.docs:
            replace_block(doc, "fedpeptao-drift", body, [f"{rel}/summary.md", f"{rel}/summary.json"])
    if args.commit:
        commit_paths([str(out / "summary.json"), str(out / "summary.md")], "FedPepTAO drift: summary")


if __name__ == "__main__":
    main()
