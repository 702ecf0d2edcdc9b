"""Client-level DP (DP-FedAvg) on FedPepTAO and FedAvg: accuracy at epsilon 1, 3, 8 and infinity with 100 clients.

McMahan et al. 2018 (arXiv 1710.06963): each sampled client's update of the communicated tensors is clipped to
norm ``C``, Gaussian noise ``z C`` is added to the sum, the mean goes to the server optimizer, and the RDP
accountant of the subsampled Gaussian (``q`` = cohort / clients per round) stops the run before it would spend
more than the target epsilon. Every arm drives ``train.py fit`` on a copy of
``configs/fed_prompt/fedpeptao_client_dp.yaml`` (MiniLM + BBC News, 100 Dirichlet(0.5) clients) with only the
server, the layer choice and the target epsilon changed; ``epsilon = inf`` is the same run without client DP.

Besides accuracy, each row reports the noise's size against the signal: the noise on the mean has norm about
``z C sqrt(d) / m`` for ``d`` communicated elements and ``m`` clients per round, while the clipped mean update has
norm at most ``C``. ``m* = z sqrt(d)`` is the cohort at which the two are equal, i.e. roughly how many clients per
round client-level DP needs before the noise stops drowning the update (with ``q`` fixed, ``N = m* / q`` clients).

Usage (resumable per run; ``--commit`` commits each run's report as it lands)::

    python benchmarks/federated_client_dp.py --seeds 0 1 2 --out benchmarks/results/federated_client_dp --commit
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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
METHODS: dict[str, dict[str, Any]] = {
    "fedpeptao": {
        "server": {"class_path": "privtune.federated.FedPepTAOServer", "init_args": {"preset": "code"}},
        "layers": "fedpeptao",
    },
    "fedavg": {"server": {"class_path": "privtune.federated.FedAvg"}, "layers": "all"},
}
LABELS = {"fedpeptao": "FedPepTAO (selected + personal layers)", "fedavg": "FedAvg (all layers)"}
EPSILONS = ("1", "3", "8", "inf")


def arm_config(base: dict[str, Any], method: str, epsilon: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """The base config with this arm's server, layers, target epsilon (``inf``: no client DP), seed and folders."""
    cfg = copy.deepcopy(base)
    cfg["seed_everything"] = seed
    cfg["trainer"]["default_root_dir"] = str(run_dir)
    fed = cfg["trainer"]["strategy"]["init_args"]["federated"]
    fed.update(copy.deepcopy(METHODS[method]))
    fed["seed"] = seed
    fed["report_dir"] = str(run_dir)
    if epsilon == "inf":
        fed["client_dp"] = None
    else:
        fed["client_dp"]["target_epsilon"] = float(epsilon)
    cfg["data"]["init_args"]["seed"] = seed
    cfg["data"]["init_args"]["partition_dir"] = str(run_dir)
    return cfg


def row_of(report: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: final accuracies, rounds run, epsilon spent, noise against signal."""
    hist = [h for h in report["history"] if "fed/personalized_acc" in h]
    last = hist[-1] if hist else {}
    dp = report.get("client_dp") or {}
    d = int(report["elements_per_client"])
    z = dp.get("noise_multiplier")
    row = {
        "global_acc": last.get("fed/global_acc"),
        "personalised_acc": last.get("fed/personalized_acc"),
        "rounds": len(report["history"]),
        "epsilon": dp.get("epsilon", math.inf) if dp else math.inf,
        "noise_multiplier": z,
        "clients_per_round": dp.get("clients_per_round"),
        "elements": d,
        "stop_reason": report.get("stop_reason"),
        "wall_seconds": report.get("wall_seconds"),
    }
    if z is not None and dp.get("clients_per_round"):
        row["noise_to_signal"] = z * math.sqrt(d) / dp["clients_per_round"]
        row["cohort_for_snr_1"] = math.ceil(z * math.sqrt(d))
    return row


def summarise(out: Path, seeds: list[int], base: str = BASE) -> str:
    """Mean ± std over the seeds present of each (method, epsilon); writes summary.json / summary.md."""
    rows = []
    for method in METHODS:
        for eps in EPSILONS:
            runs = [
                row_of(json.loads(p.read_text()))
                for s in seeds
                if (p := out / f"seed{s}" / f"{method}_eps{eps}" / "report.json").exists()
            ]
            if not runs:
                continue

            def pm(key: str, runs: list[dict[str, Any]] = runs) -> str:
                vals = [r[key] for r in runs if r.get(key) is not None]
                if not vals:
                    return "n/a"
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                return f"{100 * statistics.fmean(vals):.1f} ± {100 * sd:.1f}"

            first = runs[0]
            rows.append(
                {
                    "method": LABELS[method],
                    "target_epsilon": eps,
                    "seeds": len(runs),
                    "global_acc": pm("global_acc"),
                    "personalised_acc": pm("personalised_acc"),
                    "epsilon_spent": max(r["epsilon"] for r in runs),
                    "rounds": [r["rounds"] for r in runs],
                    "noise_multiplier": first["noise_multiplier"],
                    "noise_to_signal": first.get("noise_to_signal"),
                    "cohort_for_snr_1": first.get("cohort_for_snr_1"),
                    "elements": first["elements"],
                    "runs": runs,
                }
            )
    lines = [
        "| method | target ε | seeds | global acc (%) | personalised acc (%) | ε spent (max) | rounds | z | "
        "noise / signal | clients per round for noise = signal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        z = "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        nts = "—" if r["noise_to_signal"] is None else f"{r['noise_to_signal']:.1f}"
        m_star = "—" if r["cohort_for_snr_1"] is None else f"{r['cohort_for_snr_1']:,}"
        spent = "∞" if math.isinf(r["epsilon_spent"]) else f"{r['epsilon_spent']:.2f}"
        lines.append(
            f"| {r['method']} | {r['target_epsilon']} | {r['seeds']} | {r['global_acc']} | {r['personalised_acc']} | "
            f"{spent} | {'/'.join(map(str, r['rounds']))} | {z} | {nts} | {m_star} |"
        )
    table = "\n".join(lines) + "\n"
    write_summary(
        out, "Client-level DP (DP-FedAvg) on MiniLM + BBC News, 100 clients",
        f"Base config `{base}`; mean ± std over seeds.", base, rows, table,
    )  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/federated_client_dp")
    parser.add_argument("--base", default=BASE, help="base config with a client_dp section")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epsilons", nargs="*", default=list(EPSILONS), choices=list(EPSILONS))
    parser.add_argument("--commit", action="store_true", help="git-commit each run's report as it lands")
    parser.add_argument("--summarise-only", action="store_true", help="only rebuild summary.md from the runs")
    parser.add_argument("--docs", nargs="*", default=[], help="Markdown files with a client-dp block")
    args = parser.parse_args()

    from privtune.eval.provenance import commit_paths

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / args.base).read_text())
    if not isinstance(base["trainer"]["strategy"]["init_args"]["federated"].get("client_dp"), dict):
        parser.error(f"--base {args.base} has no trainer.strategy.init_args.federated.client_dp section to vary")
    if not args.summarise_only:
        for seed in args.seeds:
            for method in args.methods:
                for eps in args.epsilons:
                    run_dir = out / f"seed{seed}" / f"{method}_eps{eps}"
                    report_path = run_dir / "report.json"
                    if report_path.exists():
                        continue
                    report = run_config(
                        arm_config(base, method, eps, seed, run_dir), run_dir,
                        f"Client-level DP: {method}, ε={eps}, seed {seed}" if args.commit else None,
                    )  # fmt: skip
                    print(f"seed {seed} {method} eps={eps}: {row_of(report)}", flush=True)
    table = summarise(out, args.seeds, args.base)
    print(table)
    if args.docs:
        from privtune.eval.includes import replace_block

        rel = out.resolve().relative_to(ROOT).as_posix()
        body = (out / "summary.md").read_text().split("\n", 1)[1].strip()
        for doc in args.docs:
            replace_block(doc, "client-dp", body, [f"{rel}/summary.md", f"{rel}/summary.json"])
    if args.commit:
        commit_paths([str(out / "summary.json"), str(out / "summary.md")], "Client-level DP: summary")


if __name__ == "__main__":
    main()
