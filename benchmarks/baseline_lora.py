"""The README baseline: LoRA on SmolLM2-135M-Instruct for tweet sentiment, zero-shot against tuned, with wall time.

Runs ``train.py fit --config configs/baseline/lora_smollm2_tweets.yaml`` in this process (the same command as
``make train-baseline``) into a fresh run folder, reads the ``TuningReport`` it writes (zero-shot and tuned test
accuracy, macro-F1, n, training seconds and steps) and writes one JSON result file with the wall time of the whole
command, the machine's load average before and after, a 95% Wilson interval per accuracy and the run's provenance
(command, commit, date). The README's baseline table is read from that file.

Threat model: none; this is the non-private reference point the privacy methods are compared against.

Usage (the published row; ``--readme`` then rewrites the README's baseline section from the file, and
``--readme-only`` does that alone from a committed file)::

    HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/baseline_lora.py \\
        --out benchmarks/results/baseline_lora/smollm2_tweets_seed0.json --note "measured on a shared 2-core machine" \\
        --commit --readme README.md
    python benchmarks/baseline_lora.py --out benchmarks/results/baseline_lora/smollm2_tweets_seed0.json \\
        --readme README.md --readme-only
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
README_HEADING = "### Baseline: SmolLM2-135M-Instruct on tweet sentiment"


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


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def readme_section(result: dict[str, Any], result_path: str) -> str:
    """The README's baseline section, every figure from ``result`` (checked by tests/test_published_numbers.py)."""

    def interval(row: dict[str, Any]) -> str:
        low, high = row["acc_interval_95"]
        return f"{100 * low:.1f}–{100 * high:.1f}%"

    zero, tuned = result["zero_shot"], result["tuned"]
    load = f"load average {result['loadavg_before'][0]:.1f} before, {result['loadavg_after'][0]:.1f} after"
    return f"""{README_HEADING} (`make train-baseline`)

`make train-baseline` = `python train.py fit --config {result["config"]}` (LoRA r=8
on q/v, lr 1e-3, batch 16, 80 steps, 64 tokens; class-balanced splits of 2,000 train / 128 val / 300 test tweets,
seed 0).

<!-- result: {result_path} -->
From `{result_path}`
(`python benchmarks/baseline_lora.py`, which runs that command in-process): **{_duration(result["wall_seconds"])}**
wall time for the whole command, training {_duration(tuned["train_seconds"])}
({result.get("note") or "2-core CPU"}; {load}).

{markdown(result)}

<!-- result: {result_path} -->
Tuning gain: **{result["gain_points"]:+.1f} accuracy points** (95% Wilson intervals: zero-shot {interval(zero)},
tuned {interval(tuned)}).

"""


def update_readme(readme: Path, result_path: Path) -> None:
    """Replace the README's baseline section (its heading up to the next ``###``) with :func:`readme_section`."""
    text = readme.read_text(encoding="utf-8")
    start = text.find(README_HEADING)
    if start < 0:
        raise ValueError(f"{readme} has no section {README_HEADING!r}")
    end = text.find("\n### ", start + len(README_HEADING))
    end = len(text) if end < 0 else end + 1
    section = readme_section(json.loads(result_path.read_text()), result_path.as_posix())
    readme.write_text(text[:start] + section + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--run-dir", default="runs/baseline_lora_bench", help="emptied, then the run's folder")
    parser.add_argument("--out", required=True, help="JSON result file (with --readme-only: the one to read)")
    parser.add_argument("--note", default="", help="e.g. 'measured on a shared machine'")
    parser.add_argument("--commit", action="store_true", help="commit the result file when written")
    parser.add_argument("--readme", default=None, help="rewrite this README's baseline section from the result")
    parser.add_argument("--readme-only", action="store_true", help="no run: only rewrite --readme from --out")
    parser.add_argument("extra", nargs="*", help="extra train.py overrides, after --")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".json":
        parser.error(f"--out {args.out!r} must end in .json")
    if args.readme_only:
        if not args.readme or not out.is_file():
            parser.error("--readme-only needs --readme and an existing --out result file")
        update_readme(Path(args.readme), out)
        return
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config!r} does not exist")
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
    if args.readme:
        update_readme(Path(args.readme), out)


if __name__ == "__main__":
    main()
