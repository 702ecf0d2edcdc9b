"""The privacy-utility-cost frontier: every method on BBC News with SmolLM2-135M-Instruct, one regime, three seeds.

Each ``(row, seed)`` is one ``train.py fit --config configs/frontier/<row>.yaml`` run in this process, with the seed
of the run, of the data split and of the membership audit set per seed (so every row of a seed trains on the same
members and is audited against the same held-out non-members). After the fit the script measures the accuracy on the
held-out split and writes ``<out>/rows/<row>_seed<seed>.json``: the accuracy, the MembershipAudit report, the best
valid attack (AUC and TPR at 1 % FPR with bootstrap 95 % intervals), epsilon for DP-SGD rows, wall and CPU time,
bytes, and provenance. A federated row (:func:`run_federated`) sets its own seeds (split, partition over the clients,
sampling) and output folders, and fills the same fields from the run's ``report.json``: the global model's accuracy
and audit (``membership_audit: true``; the personalised models' beside them), the client-level epsilon spent and the
bytes the clients sent and received. ``RUNNERS`` maps each row family to its runner. A row file that exists is
reused, so the frontier runs in pieces (``--commit`` commits each file as it lands). Then ``frontier.json`` /
``.md`` / ``.png`` are regenerated from whatever row files exist (``--summarise-only`` does only that).

Threat model and attacks: :mod:`privtune.attacks.membership` (members = the training split, non-members = the
held-out test split of the same distribution); an attack is used only if its controls pass (docs/privacy_audit.md).

Usage::

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/privacy_frontier.py --rows zero_shot lora \\
        --seeds 0 1 2 --out benchmarks/results/privacy_frontier --commit
    .venv/bin/python benchmarks/privacy_frontier.py --summarise-only --out benchmarks/results/privacy_frontier
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from privtune.eval.frontier import (  # noqa: E402
    CONTROLS,
    ROWS,
    Row,
    attack_validity,
    best_valid,
    check_rows,
    row_file,
    update_docs,
    write_summary,
)
from privtune.eval.provenance import commit_paths, run_provenance  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _callback(trainer: Any, name: str) -> Any:  # noqa: ANN401 - a Lightning callback
    return next((cb for cb in trainer.callbacks if type(cb).__name__ == name), None)


class _Clock:
    """Wall and CPU seconds since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return round(time.perf_counter() - self.wall, 1), round(time.process_time() - self.cpu, 1)


def _regime(cli: Any) -> dict[str, Any]:  # noqa: ANN401
    dm, module, trainer = cli.datamodule, cli.model, cli.trainer
    train, _, test = dm.sizes
    regime = {
        "dataset": type(dm).__name__,
        "model": module.hparams.model,
        "members": train,
        "nonmembers": test,
        "epochs": trainer.max_epochs,
        "batch_size": dm.batch_size,
        "max_length": dm.max_length,
    }
    regime["text"] = (
        f"{regime['dataset']} on {regime['model']}: {train} members (the whole training split) seen for "
        f"{trainer.max_epochs} epochs at batch {dm.batch_size}, max_length {dm.max_length}; the {test} held-out test "
        "examples are the non-members and the accuracy split; the split is drawn by the seed, the same for every row."
    )
    return regime


def _tuned(cli: Any, steps: int) -> dict[str, int]:  # noqa: ANN401
    params = [p for p in cli.model.parameters() if p.requires_grad]
    tuned = sum(p.numel() * p.element_size() for p in params) if steps else 0
    return {"bytes": tuned, "parameters": sum(p.numel() for p in params) if steps else 0}


# ---------------------------------------------------------------------------------------------- runners
# One runner per row family: ``(row, seed, run_dir, sets, controls) -> the row file's family-specific fields``
# (accuracy, best_attack, validity, membership, dp, steps, bytes, times, overrides, regime). ``run_row`` adds the
# shared fields (names, seed, machine, provenance) and writes the file.

Runner = Callable[[Row, int, Path, list[str], dict[str, Any] | None], dict[str, Any]]


def run_central(row: Row, seed: int, run_dir: Path, sets: list[str], controls: dict | None) -> dict[str, Any]:
    """One ``train.py fit`` with the MembershipAudit callback (baselines, DP-SGD), then the held-out accuracy."""
    from train import main as train_main

    args = [
        "fit",
        "--config",
        str(ROOT / row.config),
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.callbacks.init_args.seed={seed}",  # the last callback: MembershipAudit (checked below)
        f"--trainer.default_root_dir={run_dir}",
        *(f"--{s}" for s in sets),
    ]
    log(f"{row.name} seed {seed}: train.py {' '.join(args)}")
    clock = _Clock()
    cli = train_main(args)
    fit_wall, fit_cpu = clock.read()
    audit = _callback(cli.trainer, "MembershipAudit")
    if audit is None or audit.seed != seed or audit.report is None:
        raise RuntimeError(
            f"{row.config}: MembershipAudit must be the last callback (the per-seed override sets its seed) and "
            f"report at fit end; got {audit and audit.seed} for seed {seed}."
        )
    accuracy = cli.model.evaluate(cli.datamodule.test_dataloader(), desc="accuracy (held-out)")
    wall, cpu = clock.read()
    report = audit.report
    validity = attack_validity(report, controls)
    steps = cli.trainer.global_step
    dp = _callback(cli.trainer, "OpacusDP")
    tuned = _tuned(cli, steps)
    return {
        "overrides": args[3:],
        "regime": _regime(cli),
        "accuracy": accuracy,
        "best_attack": best_valid(report, validity),
        "validity": validity,
        "membership": report,
        "dp": dp.report() if dp is not None else None,
        "steps": steps,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "fit_wall_seconds": fit_wall,
        "fit_cpu_seconds": fit_cpu,
        "bytes": {"tuned": tuned["bytes"]},
        "trainable_parameters": tuned["parameters"],
    }


FED = "trainer.strategy.init_args.federated"


def federated_overrides(seed: int, run_dir: Path) -> list[str]:
    """The per-seed ``train.py`` overrides of a federated config (its seeds and output folders live elsewhere)."""
    report_dir = run_dir / "report"
    return [
        f"--seed_everything={seed}",
        f"--data.init_args.datamodule.init_args.seed={seed}",  # the split: the same members as every row's
        f"--data.init_args.seed={seed}",  # the partition of the members over the clients
        f"--{FED}.seed={seed}",  # client sampling and order, the audit's draws
        f"--{FED}.report_dir={report_dir}",
        f"--data.init_args.partition_dir={report_dir}",
        f"--trainer.default_root_dir={run_dir}",
    ]


def _fed_regime(cli: Any, report: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN401
    from privtune.federated.sampling import plan_round

    fdm, cfg = cli.datamodule, report["config"]
    dm = fdm.inner
    train, test = len(dm.splits["train"].labels), len(dm.splits["test"].labels)
    clients = fdm.num_clients
    cohort = len(plan_round(1, clients, cfg["sample_fraction"], cfg["seed"]).sampled)
    passes = cfg["num_rounds"] * cohort / clients * cfg["local_epochs"]
    regime = {
        "dataset": type(dm).__name__,
        "model": cli.model.hparams.model,
        "members": train,
        "nonmembers": test,
        "epochs": passes,  # mean passes over each member: the central rows' epochs
        "batch_size": dm.batch_size,
        "max_length": dm.max_length,
        "clients": clients,
        "partition": f"{fdm.partition_mode} (alpha {fdm.alpha}), seed {fdm.seed}",
        "rounds": cfg["num_rounds"],
        "clients_per_round": cohort,
        "local_epochs": cfg["local_epochs"],
    }
    regime["text"] = (
        f"{regime['dataset']} on {regime['model']}: {train} members (the whole training split) partitioned over "
        f"{clients} clients ({regime['partition']}); {cfg['num_rounds']} rounds x {cohort} of {clients} clients x "
        f"{cfg['local_epochs']} local epoch(s) = {passes:g} passes over each member on average, batch "
        f"{dm.batch_size}, max_length {dm.max_length}; the {test} held-out test examples (split over the clients) "
        "are the non-members and the accuracy split; the split is drawn by the seed, the same for every row."
    )
    return regime


def run_federated(row: Row, seed: int, run_dir: Path, sets: list[str], controls: dict | None) -> dict[str, Any]:
    """One federated ``train.py fit``; accuracy and audit of the global model from the run's ``report.json``.

    The MembershipAudit callback is refused in federated runs (it would need the clients' batches), so the config
    sets ``membership_audit: true`` and the round loop attacks the final global model and the personalised models
    (:mod:`privtune.federated.membership`). The row's ``best_attack`` is the global model's (the released artefact);
    the personalised audit pools every client's examples, each scored by its own client's model (a per-client AUC
    over a client's handful of members would be noise).
    """
    from train import main as train_main

    args = ["fit", "--config", str(ROOT / row.config), *federated_overrides(seed, run_dir), *(f"--{s}" for s in sets)]
    report_path = run_dir / "report" / "report.json"
    report_path.unlink(missing_ok=True)  # left by an interrupted run: never read a stale report
    log(f"{row.name} seed {seed}: train.py {' '.join(args)}")
    clock = _Clock()
    cli = train_main(args)
    wall, cpu = clock.read()
    if not report_path.exists():
        raise RuntimeError(f"{row.config}: the federated run wrote no {report_path} (set {FED}.report_dir).")
    report = json.loads(report_path.read_text())
    audit = report.get("membership")
    if audit is None:
        raise RuntimeError(f"{row.config}: the federated run has no membership audit; set {FED}.membership_audit=true.")
    last = next((h for h in reversed(report["history"]) if "fed/global_acc" in h), None)
    if last is None:
        raise RuntimeError(f"{row.config}: no round evaluated the global model ({report.get('stop_reason')}).")
    personal = audit.get("personalised")
    validity = attack_validity(audit["global"], controls)
    personal_validity = attack_validity(personal, controls) if personal else None
    ledger = report["ledger"]
    steps = round(sum(h["clients/mean_local_steps"] * h["clients/reported"] for h in report["history"]))
    tuned = _tuned(cli, steps)
    dp = report.get("client_dp")
    return {
        "overrides": args[3:],
        "regime": _fed_regime(cli, report),
        "accuracy": {
            "acc": last["fed/global_acc"],  # the global model on the whole held-out split
            "personalised": last["fed/personalized_acc"] if personal else None,
            "n": len(cli.datamodule.inner.splits["test"].labels),
            "round": int(last["round"]),
        },
        "best_attack": best_valid(audit["global"], validity),
        "validity": validity,
        "membership": audit["global"],
        "personalised": {
            "best_attack": best_valid(personal, personal_validity),
            "validity": personal_validity,
            "membership": personal,
        }
        if personal
        else None,
        "audit": {k: audit[k] for k in ("n_members", "n_nonmembers", "participants")},
        "dp": {"level": "client", **dp} if dp else None,
        "federated": {
            "server": report["server"],
            "layers": report["config"]["layers"],
            "selected_layers": report["selected_layers"],
            "rounds_run": ledger["rounds"],
            "stop_reason": report.get("stop_reason"),
            "report": str(report_path),
        },
        "steps": steps,  # local optimizer steps summed over clients and rounds
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "fit_wall_seconds": wall,  # the audit and the evaluation run inside the fit
        "fit_cpu_seconds": cpu,
        "bytes": {
            "tuned": tuned["bytes"],
            "up": ledger["up_bytes"],
            "down": ledger["down_bytes"],
            "communicated": ledger["total_bytes"],
        },
        "trainable_parameters": tuned["parameters"],
    }


RUNNERS: dict[str, Runner] = {
    "baseline": run_central,
    "dp_sgd": run_central,
    "shaking": run_central,
    "federated": run_federated,
}


def run_row(row: Row, seed: int, out: Path, run_root: Path, sets: list[str], controls: dict | None) -> Path:
    """Train and audit ``row`` with ``seed`` unless its row file exists; returns the row file."""
    path = row_file(out, row.name, seed)
    if path.exists():
        log(f"{row.name} seed {seed}: reused {path}")
        return path
    runner = RUNNERS.get(row.family)
    if runner is None:
        raise ValueError(f"{row.name}: no runner for the {row.family!r} family (runners: {sorted(RUNNERS)}).")
    load_start = os.getloadavg()[0]
    fields = runner(row, seed, run_root / row.name / f"seed{seed}", sets, controls)
    result = {
        "row": row.name,
        "label": row.label,
        "family": row.family,
        "seed": seed,
        "config": row.config,
        **fields,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": _torch_threads(),
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
        },
        "provenance": run_provenance(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    best = result["best_attack"]
    attack = f"best valid AUC {best['auc']['value']:.3f} ({best['attack']})" if best else "no valid attack"
    log(
        f"{row.name} seed {seed}: acc {result['accuracy']['acc']:.3f}, {attack}, "
        f"{result['wall_seconds']:.0f} s wall -> {path}"
    )
    return path


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the rows asked for (reusing finished ones) and regenerate the frontier; returns the files written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=[], help=f"rows to run: {', '.join(ROWS)}, or `all`")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/privacy_frontier")
    parser.add_argument("--run-root", default="runs/privacy_frontier", help="where the runs' own files go")
    parser.add_argument("--commit", action="store_true", help="commit each row file as it lands, then the summary")
    parser.add_argument("--summarise-only", action="store_true", help="only regenerate frontier.json/.md/.png")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra train.py override for every run, without the leading dashes (e.g. model.init_args.lr=5e-4)",
    )
    parser.add_argument(
        "--docs", default=None, metavar="MARKDOWN", help="also rewrite the generated frontier block of this file"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine's 2 cores)")
    parser.add_argument(
        "--start-within", type=float, default=None, metavar="MINUTES", help="start no row after this many minutes"
    )
    args = parser.parse_args(argv)
    launched = time.monotonic()
    out = Path(args.out)
    if not args.summarise_only:
        rows = check_rows(args.rows)  # one error for every bad name, before any work
        bad_sets = [s for s in args.set if "=" not in s or s.startswith("-")]
        if bad_sets or any(s < 0 for s in args.seeds):
            parser.error(f"--set takes KEY=VALUE without dashes (got {bad_sets}); seeds must be >= 0.")
        import torch

        torch.set_num_threads(args.threads)
        controls_path = ROOT / CONTROLS
        controls = json.loads(controls_path.read_text()) if controls_path.exists() else None
        if controls is None:
            log(f"{CONTROLS} is missing: no attack can be called valid")
        for seed in args.seeds:  # seed-major: a partial run covers every row at seed 0 first
            for row in rows:
                path = row_file(out, row.name, seed)
                existed = path.exists()
                if (
                    not existed
                    and args.start_within is not None
                    and time.monotonic() - launched > 60 * args.start_within
                ):
                    log(f"{row.name} seed {seed}: not started (past --start-within {args.start_within} min)")
                    continue
                run_row(row, seed, out, Path(args.run_root), args.set, controls)
                if args.commit and not existed:
                    commit_paths([str(path)], f"Privacy frontier row: {row.name}, seed {seed}")
    paths = write_summary(out, run_provenance(), root=ROOT)
    log(f"frontier written: {', '.join(str(p) for p in paths)}")
    if args.docs and update_docs(Path(args.docs), out):
        log(f"{args.docs}: frontier block regenerated from {out}/frontier.md")
    if args.commit:
        commit_paths([str(p) for p in paths], "Privacy frontier: table and plot regenerated from the row files")
    return paths


if __name__ == "__main__":
    main()
