"""The federated rows (FedPepTAO, FedAvg, each with and without client-level DP): one federated ``train.py fit``.

The row file holds the global model's accuracy and audit from the run's ``report.json`` (the personalised models'
beside them), the client-level epsilon spent, the bytes the clients sent and received, and the regime (clients,
rounds, mean passes over each member). Threat model: the attacker sees the released global model; members = the
training split (partitioned over the clients), non-members = the held-out test split
(:mod:`privtune.federated.membership`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privtune.eval.frontier import Row, attack_validity, best_valid

from .common import ROOT, Clock, log, tuned_size

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
    clock = Clock()
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
    tuned = tuned_size(cli, steps)
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
