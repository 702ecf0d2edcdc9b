"""Run the main job (``train.py fit --config configs/default.yaml``) once and file its report as a result.

Runs the command in a child process, records its wall time, the children's peak RSS, the load average before and
after (the machine may be shared: a loaded machine makes the wall time longer, not the accuracies different), the
command, the commit and the date, and copies ``offsite_report.{json,md}`` and the run's log into ``--out``.

Run::

    HF_HUB_OFFLINE=1 python benchmarks/offsite_main_job.py --out benchmarks/results/offsite_default_bbc
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from privtune.eval.provenance import run_provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--report-dir", default="runs/default", help="the config's OffsitePipeline output_dir")
    parser.add_argument("--out", default="benchmarks/results/offsite_default_bbc")
    parser.add_argument("--note", default="", help="e.g. 'measured on a shared machine'")
    parser.add_argument("overrides", nargs="*", help="extra train.py arguments, e.g. --trainer.max_steps=20")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "train.py", "fit", "--config", args.config, *args.overrides]
    provenance = run_provenance()  # the commit the run starts from, not the one it ends on
    load_before = os.getloadavg()
    start = time.perf_counter()
    log_path = Path(args.report_dir) / "train.log"  # the raw log stays with the run (it holds local paths)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if code != 0:
        raise SystemExit(f"train.py exited with {code}; see {log_path}")
    for name in ("offsite_report.json", "offsite_report.md", "offsite_report.png"):
        if (Path(args.report_dir) / name).is_file():
            shutil.copy(Path(args.report_dir) / name, out / name)
    run = provenance | {
        "train_command": " ".join(["python", *command[1:]]),
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(peak_kb / 1024),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpu_count": os.cpu_count(),
        "note": args.note,
    }
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
