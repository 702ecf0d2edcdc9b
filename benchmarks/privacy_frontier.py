"""The privacy-utility-cost frontier: every method on BBC News with SmolLM2-135M-Instruct, one regime, three seeds.

Each ``(row, seed)`` is one ``train.py fit --config configs/frontier/<row>.yaml`` run in this process, with the seed
of the run, of the data split and of the membership audit set per seed (so every row of a seed trains on the same
members and is audited against the same held-out non-members). After the fit the script measures the accuracy on the
held-out split and writes ``<out>/rows/<row>_seed<seed>.json``: the accuracy, the MembershipAudit report, the best
valid attack (AUC and TPR at 1 % FPR with bootstrap 95 % intervals), epsilon for DP-SGD rows, wall and CPU time,
bytes, and provenance. A row file that exists is reused, so the frontier runs in pieces (``--commit`` commits each
file as it lands). Then ``frontier.json`` / ``.md`` / ``.png`` are regenerated from whatever row files exist
(``--summarise-only`` does only that).

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


def run_row(row: Row, seed: int, out: Path, run_root: Path, sets: list[str], controls: dict | None) -> Path:
    """Train and audit ``row`` with ``seed`` unless its row file exists; returns the row file."""
    path = row_file(out, row.name, seed)
    if path.exists():
        log(f"{row.name} seed {seed}: reused {path}")
        return path
    from train import main as train_main

    run_dir = run_root / row.name / f"seed{seed}"
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
    load_start = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    cli = train_main(args)
    fit_wall, fit_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    audit = _callback(cli.trainer, "MembershipAudit")
    if audit is None or audit.seed != seed or audit.report is None:
        raise RuntimeError(
            f"{row.config}: MembershipAudit must be the last callback (the per-seed override sets its seed) and "
            f"report at fit end; got {audit and audit.seed} for seed {seed}."
        )
    accuracy = cli.model.evaluate(cli.datamodule.test_dataloader(), desc="accuracy (held-out)")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    report = audit.report
    validity = attack_validity(report, controls)
    params = [p for p in cli.model.parameters() if p.requires_grad]
    steps = cli.trainer.global_step
    dp = _callback(cli.trainer, "OpacusDP")
    result = {
        "row": row.name,
        "label": row.label,
        "family": row.family,
        "seed": seed,
        "config": row.config,
        "overrides": args[3:],
        "regime": _regime(cli),
        "accuracy": accuracy,
        "best_attack": best_valid(report, validity),
        "validity": validity,
        "membership": report,
        "dp": dp.report() if dp is not None else None,
        "steps": steps,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "fit_wall_seconds": round(fit_wall, 1),
        "fit_cpu_seconds": round(fit_cpu, 1),
        "bytes": {"tuned": sum(p.numel() * p.element_size() for p in params) if steps else 0},
        "trainable_parameters": sum(p.numel() for p in params) if steps else 0,
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
    log(
        f"{row.name} seed {seed}: acc {accuracy['acc']:.3f}, best valid AUC "
        f"{best['auc']['value']:.3f} ({best['attack']})" * bool(best) + f", {wall:.0f} s wall -> {path}"
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
