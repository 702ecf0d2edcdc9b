"""The offsite rows (ScaleOT, OT's uniform drop, GradOT): the model owner's stage, the export and OffsitePipeline.

The row file holds the plug-in model's accuracy and audit (the data owner's adapters in the original model, the one
the model owner deploys), full fine-tuning's audit beside it, the extraction gap and the bytes, all read from the
pipeline's ``offsite_report.json``; one ScaleOT run writes both ``offsite_scaleot`` and ``offsite_ot_uniform``.
Threat model: members = the data owner's training split, non-members = the held-out test split
(:mod:`privtune.attacks.membership`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privtune.eval.frontier import ROWS, Row, attack_validity, best_valid

from .common import ROOT, Clock, log

OFFSITE_ARMS = {"offsite_scaleot": "scaleot", "offsite_gradot": "gradot", "offsite_ot_uniform": "ot_uniform_drop_"}
"""The ``membership.<arm>`` / ``arms.<arm>`` entry of ``offsite_report.json`` each offsite row reads (OT's arm is
named by its layout, ``ot_uniform_drop_{bottom}-{k}-{top}``: matched by prefix)."""


def offsite_config(config: Path, seed: int, run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The row's config with the seed's settings, and those settings as ``key=value`` strings (the row's record).

    The seed of the run, of the owner's public text and of LayerReplace; the pipeline's split seed (the members: the
    same split as every row's with this seed) and audit seed; the emulator's, the pipeline's and the run's folders.
    Written as a file because two callbacks need a folder and ``train.py`` overrides reach only the last one.
    """
    import yaml

    cfg = yaml.safe_load(config.read_text())
    sets = {"seed_everything": seed, "data.init_args.seed": seed, "trainer.default_root_dir": str(run_dir)}
    per_callback = {
        "LayerReplace": {"seed": seed},
        "EmulatorExport": {"output_dir": str(run_dir / "emulator")},
        "OffsitePipeline": {"seed": seed, "audit_seed": seed, "output_dir": str(run_dir / "pipeline")},
    }
    cfg["seed_everything"], cfg["data"]["init_args"]["seed"] = seed, seed
    cfg["trainer"]["default_root_dir"] = str(run_dir)
    names = [cb["class_path"].rsplit(".", 1)[-1] for cb in cfg["trainer"]["callbacks"]]
    if names[-1] != "OffsitePipeline" or "EmulatorExport" not in names:
        raise ValueError(f"{config}: an offsite row needs EmulatorExport, then OffsitePipeline last; got {names}.")
    for name, callback in zip(names, cfg["trainer"]["callbacks"], strict=True):
        for key, value in per_callback.get(name, {}).items():
            callback.setdefault("init_args", {})[key] = value
            sets[f"{name}.{key}"] = value
    return cfg, [f"{k}={v}" for k, v in sets.items()]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _adapter_tensors(folder: Path) -> tuple[int, int]:
    """``(bytes, parameters)`` of the adapter tensors the data owner sends back."""
    import torch

    state = torch.load(Path(folder) / "adapters.pt", map_location="cpu", weights_only=True)
    return sum(t.numel() * t.element_size() for t in state.values()), sum(t.numel() for t in state.values())


def _audited(report: dict[str, Any], controls: dict | None) -> dict[str, Any]:
    validity = attack_validity(report, controls)
    return {"best_attack": best_valid(report, validity), "validity": validity, "membership": report}


def _offsite_fields(row: Row, report: dict[str, Any], run_dir: Path, controls: dict | None) -> dict[str, Any]:
    """One offsite row's fields from the pipeline's report: its arm's plug-in accuracy and audit, the rest beside."""
    arm = next((a for a in report["arms"] if a.startswith(OFFSITE_ARMS[row.name])), None)
    if arm is None or arm not in report.get("membership", {}):
        raise RuntimeError(
            f"{row.name}: no `{OFFSITE_ARMS[row.name]}` arm with a membership audit in the offsite report (arms "
            f"{sorted(report['arms'])}, audited {sorted(report.get('membership', {}))}); set membership_audit: true."
        )
    meta, settings = report["meta"], report["settings"]
    exported = not arm.startswith("ot_uniform_drop_")  # OT's uniform drop holds original blocks: never shipped
    adapters = run_dir / "pipeline" / ("adapters" if exported else f"adapters_{arm}")
    tuned, parameters = _adapter_tensors(adapters)
    up = _folder_bytes(adapters)
    emulator_params = report["arms"][arm]["params"]
    down = _folder_bytes(run_dir / "emulator") if exported else 4 * emulator_params  # fp32, as it would ship
    audit = report["membership"][arm]
    return {
        "accuracy": {"acc": report["arms"][arm]["plug_in"], "n": meta["test_size"], "arm": arm},
        **_audited(audit, controls),
        "full_ft": {"accuracy": settings["ft"]["acc"], **_audited(report["membership"]["full_ft"], controls)},
        "extraction": {
            "accuracy": settings["extraction"]["acc"] if exported and "extraction" in settings else None,
            "gap_points": report.get("extraction_gap_points") if exported else None,
        },
        "offsite": {
            "arm": arm,
            "arms": report["arms"],
            "settings": settings,
            "emulator_parameters": emulator_params,
            "emulator_shipped": exported,
            "stage_seconds": report["stage_seconds"],
            "report": str(run_dir / "pipeline" / "offsite_report.json"),
        },
        "dp": None,
        "steps": meta["max_steps"],  # the data owner's steps on the emulator
        "bytes": {"tuned": tuned, "up": up, "down": down, "communicated": up + down},
        "trainable_parameters": parameters,
    }


def _offsite_regime(report: dict[str, Any]) -> dict[str, Any]:
    meta = report["meta"]
    epochs = next(iter(report["membership"].values()))["meta"]["data_owner_epochs"]
    train, test = meta["train_size"], meta["test_size"]
    regime = {
        "dataset": "BBCNews" if meta["task"] == "bbc_news" else meta["task"],
        "model": meta["model"],
        "members": train,
        "nonmembers": test,
        "epochs": epochs,
        "batch_size": meta["batch_size"],
        "max_length": meta["max_length"],
        "data_owner_steps": meta["max_steps"],
    }
    regime["text"] = (
        f"{regime['dataset']} on {regime['model']}: {train} members (the data owner's whole training split) seen for "
        f"{epochs:g} epochs ({meta['max_steps']} steps through the emulator) at batch {meta['batch_size']}, "
        f"max_length {meta['max_length']}; the {test} held-out test examples are the non-members and the accuracy "
        "split; the split is drawn by the seed, the same for every row."
    )
    return regime


def run_offsite(row: Row, seed: int, run_dir: Path, sets: list[str], controls: dict | None) -> dict[str, Any]:
    """One offsite ``train.py fit`` (model owner's stage, export, OffsitePipeline); the row's plug-in from its report.

    The attack sees the plug-in model the model owner deploys (the data owner's adapters in the original model);
    members are the data owner's training split. Every offsite row of the same config comes out of the same run
    (``offsite_scaleot`` and ``offsite_ot_uniform``): their fields are returned under ``also``.
    """
    import yaml

    from train import main as train_main

    cfg, applied = offsite_config(ROOT / row.config, seed, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    report_path = run_dir / "pipeline" / "offsite_report.json"
    report_path.unlink(missing_ok=True)  # left by an interrupted run: never read a stale report
    args = ["fit", "--config", str(config), *(f"--{s}" for s in sets)]
    log(f"{row.name} seed {seed}: train.py {' '.join(args)}")
    clock = Clock()
    train_main(args)
    wall, cpu = clock.read()
    report = json.loads(report_path.read_text())
    shared = {
        "overrides": applied + args[3:],
        "regime": _offsite_regime(report),
        "wall_seconds": wall,  # the whole run, shared by the rows it yields
        "cpu_seconds": cpu,
        "fit_wall_seconds": wall,  # the tuning, the audits and the evaluations run inside the fit
        "fit_cpu_seconds": cpu,
        "shared_run": [r.name for r in ROWS.values() if r.config == row.config],
    }
    also = {
        other: shared | _offsite_fields(ROWS[other], report, run_dir, controls)
        for other in shared["shared_run"]
        if other != row.name
    }
    return shared | _offsite_fields(row, report, run_dir, controls) | {"also": also}
