"""Reports of federated runs: JSON, a Markdown table and accuracy-per-round plots.

Summaries follow FedPepTAO's evaluation (arXiv 2310.15080, spec §10-§11): personalised accuracy per round, the
best over rounds (optimistic on test, as in the paper) next to the final-round value, rounds to reach a target
accuracy, and the bytes communicated; and beside it the global accuracy (the global prompt alone, on the pooled
evaluation split), which does not credit a method's personal layers. matplotlib is optional; without it only JSON
and Markdown are written.

Threat model: none; reports hold metrics and configuration only, never data or prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ACC = "fed/personalized_acc"
GLOBAL_ACC = "fed/global_acc"


def summarize(run: dict[str, Any], target: float | None = None) -> dict[str, Any]:
    """Final / best accuracy, rounds to ``target``, and total bytes of one run's report dict."""
    points = [(h["round"], h[ACC]) for h in run["history"] if ACC in h]
    spent = [h["privacy/epsilon"] for h in run["history"] if "privacy/epsilon" in h]
    accs = [a for _, a in points]
    reach = next((int(r) for r, a in points if target is not None and a >= target), None)
    global_points = [(h["round"], h[GLOBAL_ACC]) for h in run["history"] if GLOBAL_ACC in h]
    global_accs = [a for _, a in global_points]
    global_reach = next((int(r) for r, a in global_points if target is not None and a >= target), None)
    ledger = run["ledger"]
    return {
        "server": run["server"],
        "label": run.get("label", run["server"]),
        "final_acc": accs[-1] if accs else None,
        "best_acc": max(accs) if accs else None,
        "rounds_to_target": reach,
        "final_global_acc": global_accs[-1] if global_accs else None,
        "best_global_acc": max(global_accs) if global_accs else None,
        "rounds_to_target_global": global_reach,
        "up_bytes": ledger["up_bytes"],
        "down_bytes": ledger["down_bytes"],
        "total_bytes": ledger["total_bytes"],
        "round_seconds_total": ledger["round_seconds_total"],
        "num_selected_layers": len(run.get("selected_layers", [])),
        "elements_per_client": run.get("elements_per_client"),
        "epsilon": spent[-1] if spent else None,  # client-level DP spend after the last round (None: no DP)
    }


def markdown_table(summaries: Sequence[dict[str, Any]], target: float | None = None) -> str:
    """One Markdown table row per run; an epsilon column when a run used client-level DP."""
    with_eps = any(s.get("epsilon") is not None for s in summaries)
    head = (
        "| method | layers | final pers. acc | best pers. acc | final global acc | pers. rounds to "
        + (f"{target:.2f}" if target is not None else "target")
        + " | bytes up+down | sim. time (s) |"
        + (" client-level epsilon |" if with_eps else "")
        + "\n|---|---|---|---|---|---|---|---|"
        + ("---|" if with_eps else "")
        + "\n"
    )
    rows = []
    for s in summaries:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        eps = s.get("epsilon")
        rows.append(
            f"| {s['label']} | {s['num_selected_layers']} | {fmt(s['final_acc'])} | {fmt(s['best_acc'])} | "
            f"{fmt(s.get('final_global_acc'))} | "
            f"{s['rounds_to_target'] if s['rounds_to_target'] is not None else 'not reached'} | "
            f"{s['total_bytes']:,} | {s['round_seconds_total']:.1f} |"
            + ((" inf |" if eps == float("inf") else f" {fmt(eps)} |") if with_eps else "")
        )
    return head + "\n".join(rows) + "\n"


def plot_accuracy(runs: Sequence[dict[str, Any]], path: Path, title: str = "", x_axis: str = "round") -> bool:
    """Accuracy per round (``x_axis="round"``) or against cumulative bytes up + down (``"bytes"``), one line per
    run; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        if x_axis == "bytes":
            pts = [(h["comm/cum_up_bytes"] + h["comm/cum_down_bytes"], h[ACC]) for h in run["history"] if ACC in h]
        else:
            pts = [(h["round"], h[ACC]) for h in run["history"] if ACC in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=run.get("label", run["server"]))
    ax.set_xlabel("round" if x_axis == "round" else "cumulative bytes (up + down)")
    ax.set_ylabel("personalised accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_run_report(out_dir: Path, run: dict[str, Any], target: float | None = None) -> None:
    """``report.json``, ``report.md`` and ``accuracy.png`` for one run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(run, indent=2, default=str))
    summary = summarize(run, target)
    md = [f"# Federated run: {run['server']}", "", markdown_table([summary], target), ""]
    md.append(f"Selected layers: {run.get('selected_layers')}")
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    plot_accuracy([run], out_dir / "accuracy.png", title=run["server"])


def write_comparison(out_dir: Path, runs: Sequence[dict[str, Any]], target: float | None, title: str = "") -> str:
    """Table and plot over several runs (one per server optimizer); returns the Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(r, target) for r in runs]
    table = markdown_table(summaries, target)
    (out_dir / "comparison.json").write_text(json.dumps(summaries, indent=2))
    (out_dir / "comparison.md").write_text(f"# {title}\n\n{table}")
    plot_accuracy(runs, out_dir / "accuracy_per_round.png", title=title)
    plot_accuracy(runs, out_dir / "accuracy_vs_bytes.png", title=title, x_axis="bytes")
    return table
