"""What the federated benchmark scripts share: one run of a derived config through ``train.py``, and the summary.

:func:`run_config` writes a run's config into its folder, runs ``train.py fit`` on it in this process, adds the
wall time to the run's ``report.json`` and, with ``commit``, commits the folder (not the prompt tensor);
:func:`write_summary` writes ``summary.json`` / ``summary.md`` with the command, commit and date. Used by
``benchmarks/federated_client_dp.py`` and ``benchmarks/fedpeptao_drift.py``. Threat model: none (bookkeeping).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml


def run_config(config: dict[str, Any], run_dir: Path, commit: str | None = None) -> dict[str, Any]:
    """``train.py fit`` on ``config`` written to ``run_dir/config.yaml``; returns the run's report (with
    ``wall_seconds``). The config must send the report to ``run_dir`` (``report_dir``). With ``commit``, the run's
    files (everything but ``*.pt``) are committed with that message."""
    from privtune.eval.provenance import commit_paths
    from train import main as train_main

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    train_main(["fit", "--config", str(path)])
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text())
    report["wall_seconds"] = time.perf_counter() - start
    report_path.write_text(json.dumps(report, indent=2, default=str))
    if commit is not None:
        commit_paths([str(f) for f in sorted(run_dir.iterdir()) if f.is_file() and f.suffix != ".pt"], commit)
    return report


def write_summary(out: Path, title: str, setting: str, base: str, rows: list[dict[str, Any]], table: str) -> None:
    """``out/summary.json`` (provenance, base config, rows) and ``out/summary.md`` (title, setting, provenance,
    table)."""
    from privtune.eval.provenance import run_provenance

    prov = run_provenance()
    (out / "summary.json").write_text(json.dumps({"provenance": prov, "base": base, "rows": rows}, indent=2))
    (out / "summary.md").write_text(
        f"# {title}\n\n{setting} Command: `{prov['command']}`, commit {prov['commit']}, {prov['date_utc']}.\n\n" + table
    )
