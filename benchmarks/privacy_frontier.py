"""The privacy-utility-cost frontier: every method on BBC News with SmolLM2-135M-Instruct, one regime, three seeds.

This script is the CLI: it checks the rows and settings before any work, runs each ``(row, seed)`` seed-major with
the runner of the row's family, and writes ``<out>/rows/<row>_seed<seed>.json``. Every row of a seed trains on the
same members and is audited against the same held-out non-members. The runners live in ``benchmarks/frontier_rows/``,
one module per row family (``central.py`` for the baselines and DP-SGD, ``shaking.py``, ``federated.py``,
``offsite.py``; the row file's shared fields in ``common.py``), registered in its ``RUNNERS``. A row file that exists
is reused, so the frontier runs in pieces (``--commit`` commits each file as it lands). Then ``frontier.json`` /
``.md`` / ``.png`` are regenerated from whatever row files exist (``--summarise-only`` does only that; ``--docs``
also rewrites the generated block of the documents named).

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # as a script it is there already; loaded by path it is not
    sys.path.append(str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from frontier_rows import (  # noqa: E402, F401 - the runners, reachable from the script as before
    RUNNERS,
    ensure_implanted,
    implant_config,
    run_central,
    run_federated,
    run_offsite,
    run_shaking,
)
from frontier_rows.common import log, write_row  # noqa: E402

from privtune.eval.frontier import CONTROLS, ROWS, Row, check_rows, row_file, update_docs, write_summary  # noqa: E402
from privtune.eval.provenance import commit_paths, run_provenance  # noqa: E402


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
            write_row(ROWS[name], seed, out, sibling, load_start)
    return write_row(row, seed, out, fields, load_start)


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
