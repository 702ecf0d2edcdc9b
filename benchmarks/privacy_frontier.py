"""The privacy-utility-cost frontier: every method on BBC News with SmolLM2-135M-Instruct, one regime, three seeds.

Each ``(row, seed)`` is one ``train.py fit --config configs/frontier/<row>.yaml`` run in this process, with the seed
of the run, of the data split and of the membership audit set per seed (so every row of a seed trains on the same
members and is audited against the same held-out non-members). After the fit the script measures the accuracy on the
held-out split and writes ``<out>/rows/<row>_seed<seed>.json``: the accuracy, the MembershipAudit report, the best
valid attack (AUC and TPR at 1 % FPR with bootstrap 95 % intervals), epsilon for DP-SGD rows, wall and CPU time,
bytes, and provenance. A federated row (:func:`run_federated`) sets its own seeds (split, partition over the clients,
sampling) and output folders, and fills the same fields from the run's ``report.json``: the global model's accuracy
and audit (``membership_audit: true``; the personalised models' beside them), the client-level epsilon spent and the
bytes the clients sent and received. An offsite row (:func:`run_offsite`) runs the model owner's stage, the
emulator export and OffsitePipeline with the seed's settings written into a copy of its config, and reads the
plug-in model's accuracy and audit, full fine-tuning's audit beside it, the extraction gap and the bytes from the
pipeline's ``offsite_report.json``; one ScaleOT run writes both ``offsite_scaleot`` and ``offsite_ot_uniform``.
A shaking row (:func:`run_shaking`) first makes the implanted shaken model its config names when the folder is
missing (:func:`ensure_implanted`: ``configs/shaking/smollm2_implant.yaml`` with the row's key; its time lands under
``implant``), then runs as a central row, the audit attacking the horizontally recovered model.
``RUNNERS`` maps each row family to its runner. A row file that exists is
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


# ---------------------------------------------------------------------------------------------- shaking

IMPLANT_CONFIG = "configs/shaking/smollm2_implant.yaml"
_KEY_OPTIONS = ("key_path", "operators", "chain_length", "chain", "scales", "permute", "pin")


def _init_args(cfg: dict[str, Any], name: str, where: Path | str) -> dict[str, Any]:
    found = [cb.get("init_args", {}) for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith(f".{name}")]
    if len(found) != 1:
        raise ValueError(f"{where}: a shaking row needs exactly one {name} callback; found {len(found)}.")
    return found[0]


def implant_config(row_config: Path) -> tuple[dict[str, Any], Path]:
    """``configs/shaking/smollm2_implant.yaml`` with the row's key options and the row's model folder as ``save_dir``.

    The row's config decides (one source of truth): its ``EmbeddingShaking`` key options (``key_path``, the chain
    and scales) and its ``model.init_args.model`` (the implanted shaken model, written by ShakeRecovery's
    ``save_dir``). Returns the config and the model folder.
    """
    import yaml

    row = yaml.safe_load(row_config.read_text())
    shaking = _init_args(row, "EmbeddingShaking", row_config)
    model_dir = Path(row["model"]["init_args"]["model"])
    cfg = yaml.safe_load((ROOT / IMPLANT_CONFIG).read_text())
    implant = _init_args(cfg, "EmbeddingShaking", IMPLANT_CONFIG)
    for option in _KEY_OPTIONS:
        implant.pop(option, None)
        if option in shaking:
            implant[option] = shaking[option]
    cfg["model"]["init_args"]["save_dir"] = str(model_dir)
    cfg["trainer"]["default_root_dir"] = f"{model_dir}_run"
    return cfg, model_dir


def ensure_implanted(row_config: Path) -> dict[str, Any]:
    """The shaking row's prerequisite: the implanted shaken model, made by ``train.py`` when its folder is missing.

    CypherTalk (Chen et al., arXiv 2403.07283) tunes a model whose representation layer is shaken with the data
    owner's key and implanted (awareness + function recovery on public text) so that it works under the key; the
    frontier's shaking rows tune that model, so a fresh clone runs :data:`IMPLANT_CONFIG` first (with the row's key
    and model folder, :func:`implant_config`). Its time and provenance are kept in ``<model>_implant.json`` and
    returned (``ran_here``: whether this call made it), so every row file of the key carries the one-off cost.
    """
    import yaml

    cfg, model_dir = implant_config(row_config)
    record = model_dir.with_name(f"{model_dir.name}_implant.json")
    if (model_dir / "config.json").exists():
        found = json.loads(record.read_text()) if record.exists() else {"model": str(model_dir), "record": None}
        return found | {"ran_here": False}
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    written = model_dir.with_name(f"{model_dir.name}_implant.yaml")
    written.write_text(f"# {IMPLANT_CONFIG} with the key options of {row_config}\n" + yaml.safe_dump(cfg))
    from train import main as train_main

    log(f"implanted model {model_dir} is missing: train.py fit --config {written}")
    clock = _Clock()
    cli = train_main(["fit", "--config", str(written)])
    wall, cpu = clock.read()
    if not (model_dir / "config.json").exists():
        raise RuntimeError(f"{written}: the implantation ran but wrote no model to {model_dir}.")
    info = {
        "config": IMPLANT_CONFIG,
        "written_config": str(written),
        "key_options_from": str(row_config.relative_to(ROOT) if row_config.is_relative_to(ROOT) else row_config),
        "model": str(model_dir),
        "key_path": _init_args(cfg, "EmbeddingShaking", written)["key_path"],
        "steps": cli.trainer.global_step,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "torch_threads": _torch_threads(),
        "provenance": run_provenance(),
    }
    record.write_text(json.dumps(info, indent=1) + "\n")
    del cli
    return info | {"ran_here": True}


def run_shaking(row: Row, seed: int, run_dir: Path, sets: list[str], controls: dict | None) -> dict[str, Any]:
    """A shaking row: the implanted model on demand (:func:`ensure_implanted`), then :func:`run_central`.

    The audit (MembershipAudit after EmbeddingShaking with ``recovery='horizontal'``) attacks the recovered model,
    the one the data owner ends with and queries in plain text; its reference is the untuned implanted model seen
    through the same recovery. ``implant`` records the prerequisite (its wall time counts once per key, not in the
    row's ``wall_seconds``).
    """
    implant = ensure_implanted(ROOT / row.config)
    return run_central(row, seed, run_dir, sets, controls) | {"implant": implant}


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


# ---------------------------------------------------------------------------------------------- offsite

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
    clock = _Clock()
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


RUNNERS: dict[str, Runner] = {
    "baseline": run_central,
    "dp_sgd": run_central,
    "shaking": run_shaking,
    "federated": run_federated,
    "offsite": run_offsite,
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
    for name, sibling in fields.pop("also", {}).items():  # other rows the same run yields (offsite)
        if not row_file(out, name, seed).exists():
            _write_row(ROWS[name], seed, out, sibling, load_start)
    return _write_row(row, seed, out, fields, load_start)


def _write_row(row: Row, seed: int, out: Path, fields: dict[str, Any], load_start: float) -> Path:
    """The row file: the runner's fields with the shared ones (names, seed, machine, provenance)."""
    path = row_file(out, row.name, seed)
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
        "--docs", nargs="+", default=[], metavar="MARKDOWN", help="also rewrite the generated frontier block of these"
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
                before = set((out / "rows").glob("*.json"))
                if (
                    not existed
                    and args.start_within is not None
                    and time.monotonic() - launched > 60 * args.start_within
                ):
                    log(f"{row.name} seed {seed}: not started (past --start-within {args.start_within} min)")
                    continue
                run_row(row, seed, out, Path(args.run_root), args.set, controls)
                landed = sorted(set((out / "rows").glob("*.json")) - before)  # with the rows the same run yields
                if args.commit and not existed:
                    commit_paths([str(p) for p in landed], f"Privacy frontier row: {row.name}, seed {seed}")
    paths = write_summary(out, run_provenance(), root=ROOT)
    log(f"frontier written: {', '.join(str(p) for p in paths)}")
    for doc in args.docs:
        if update_docs(Path(doc), out):
            log(f"{doc}: frontier block regenerated from {out}/frontier.md")
    if args.commit:
        commit_paths([str(p) for p in paths], "Privacy frontier: table and plot regenerated from the row files")
    return paths


if __name__ == "__main__":
    main()
