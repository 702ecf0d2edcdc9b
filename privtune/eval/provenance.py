"""Where a result file came from: the command, the git commit and the date, and committing result files as they land.

Every published figure comes from a result file written by a script; each file records its provenance so a reader
can rerun it. Benchmarks that run for hours commit each file as it lands (:func:`commit_paths`), so a killed run
loses at most one row.

Threat model: none; provenance holds a command line, a commit hash and a date, never data.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_provenance() -> dict[str, Any]:
    """What produced a result file: the command line, the git commit (with a ``-dirty`` mark) and the UTC date."""
    commit: str | None = None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        commit = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        commit = None  # not a git checkout: recorded as unknown
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def commit_paths(paths: list[str], message: str, attempts: int = 5) -> bool:
    """``git add`` and commit only ``paths`` (retrying while another commit holds the index lock); True on success."""
    for _ in range(attempts):
        added = subprocess.run(["git", "add", "-f", *paths], check=False, capture_output=True)
        if (
            added.returncode == 0
            and subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], check=False).returncode == 0
        ):
            return True
        time.sleep(2)
    print(f"could not commit {paths}; commit them by hand", flush=True)
    return False
