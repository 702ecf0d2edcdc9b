"""The README baseline: LoRA on SmolLM2-135M-Instruct for tweet sentiment, zero-shot against tuned, with wall time.

Runs ``train.py fit --config configs/baseline/lora_smollm2_tweets.yaml`` in this process (the same command as
``make train-baseline``) into a fresh run folder, reads the ``TuningReport`` it writes (zero-shot and tuned test
accuracy, macro-F1, n, training seconds and steps) and writes one JSON result file with the wall time of the whole
command, the machine's load average before and after, a 95% Wilson interval per accuracy and the run's provenance
(command, commit, date). The README's baseline table is read from that file.

Threat model: none; this is the non-private reference point the privacy methods are compared against.

Usage (the published row)::

    HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/baseline_lora.py \\
        --out benchmarks/results/baseline_lora/smollm2_tweets_seed0.json --note "measured on a shared 2-core machine"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from privtune.eval.offsite_report import wilson_interval  # noqa: E402
from privtune.eval.provenance import commit_paths, run_provenance  # noqa: E402

DEFAULT_CONFIG = "configs/baseline/lora_smollm2_tweets.yaml"


def run_baseline(config: str, run_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One ``train.py fit`` of ``config`` into an emptied ``run_dir``; its tuning report plus the wall time."""
    from train import main as train_main

    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale report from an earlier run must not be read as this one's
    start = time.perf_counter()
    train_main(["fit", "--config", config, f"--trainer.default_root_dir={run_dir}", *extra])
    wall = time.perf_counter() - start
    reports = sorted(run_dir.rglob("tuning_report.json"))
    if len(reports) != 1:
        raise RuntimeError(f"expected one tuning_report.json under {run_dir}, found {[str(p) for p in reports]}")
    report = json.loads(reports[0].read_text())
    rows = report["rows"]
    for row in rows.values():  # the sampling error of each accuracy on n test examples
        row["acc_interval_95"] = list(wilson_interval(row["acc"], int(row["n"])))
    return {
        "split": report["split"],
        "zero_shot": rows["zero-shot"],
        "tuned": rows["tuned"],
        "gain_points": 100 * (rows["tuned"]["acc"] - rows["zero-shot"]["acc"]),
        "wall_seconds": round(wall, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    """The README table of one result."""
    lines = [f"| setting | {result['split']} acc | macro-F1 | n |", "|---|---|---|---|"]
    for name, key in (("zero-shot", "zero_shot"), ("LoRA-tuned", "tuned")):
        row = result[key]
        lines.append(f"| {name} | {100 * row['acc']:.1f}% | {row['f1']:.3f} | {row['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--run-dir", default="runs/baseline_lora_bench", help="emptied, then the run's folder")
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--note", default="", help="e.g. 'measured on a shared machine'")
    parser.add_argument("--commit", action="store_true", help="commit the result file when written")
    parser.add_argument("extra", nargs="*", help="extra train.py overrides, after --")
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config!r} does not exist")
    out = Path(args.out)
    if out.suffix != ".json":
        parser.error(f"--out {args.out!r} must end in .json")
    provenance = run_provenance()  # before the run: the commit the run started from
    load_before = os.getloadavg()
    result = run_baseline(args.config, Path(args.run_dir), args.extra)
    machine = {"cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    result = {"config": args.config, "overrides": args.extra, **result, **machine, **provenance, "note": args.note}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result), flush=True)
    print(f"wall {result['wall_seconds']:.1f} s; written to {out}", flush=True)
    if args.commit:
        commit_paths([str(out)], f"Baseline LoRA result: {out.stem}")


if __name__ == "__main__":
    main()
