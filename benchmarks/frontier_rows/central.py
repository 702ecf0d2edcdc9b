"""The central rows (baselines, DP-SGD): one ``train.py fit`` with the MembershipAudit callback, then the accuracy.

The row file holds the held-out accuracy, the MembershipAudit report and the best valid attack, epsilon for DP-SGD
rows (OpacusDP's report), the steps, times and tuned bytes, the per-seed overrides and the regime. Threat model and
attacks: :mod:`privtune.attacks.membership` (members = the training split, non-members = the held-out test split of
the same distribution); an attack is used only if its controls pass (docs/privacy_audit.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privtune.eval.frontier import Row, attack_validity, best_valid

from .common import ROOT, Clock, callback, log, tuned_size


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
    clock = Clock()
    cli = train_main(args)
    fit_wall, fit_cpu = clock.read()
    audit = callback(cli.trainer, "MembershipAudit")
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
    dp = callback(cli.trainer, "OpacusDP")
    tuned = tuned_size(cli, steps)
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
