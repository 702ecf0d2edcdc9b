"""The model owner's stage 1 through training, read from the offsite ablation's rows: harmonizer error and loss curves.

Diagnosis for ScaleOT (arXiv 2412.09812) at SmolLM2-135M: every ablation row (``benchmarks/offsite_ablation.py``)
records its stage 1 in its report (``stage1_curves``, written by ``OffsitePipeline``): the model owner's loss per step
(with its LM and KD parts where the module logs them: OT's emulator distillation, arXiv 2302.04870 §2.3) and, every
10 steps, each harmonizer's normalised error against the block it stands in for,
``||H_i(h_in) - h_out||^2 / ||h_out - h_in||^2`` on the step's held-out batch (0 = the block itself, 1.0 = dropping
the block, above 1 = worse than dropping it). This script groups the rows by stage-1 recipe and writes, per task,
how those curves move: the harmonizers' median error and the share of them worse than a plain drop at the first
and last record, and the owner's loss at the start and end. Nothing is re-run: it reads the committed row files.

Series (one stage 1 per row; a seed counts once per series):

* ``(d) ScaleOT, N steps``: the published stage 1 (LM loss on the owner's corpus under sampled replacement, no KD
  term); rows ``a_d`` (else ``e``, ``b`` or ``akd<N>``: the same stage 1) for 100 steps, ``d300``, ``d1000``;
  ``dfresh`` / ``d300fresh``: the same with every step on new owner text (no block seen twice).
* ``(g) relative reward``, ``(c) identity stand-ins`` (error 1 by construction), ``(f) imitation only`` (harmonizers
  only warm-started on their own block).
* ``(a) OT 2-13-2 + KD, N steps``: OT's uniform drop distilled in process (rows ``akd<N>``; the LM and KD parts of
  OT's objective per step, no harmonizers).

Run::

    python benchmarks/offsite_stage1_curves.py --docs docs/offsite_tuning.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from offsite_loo_importance import spearman  # noqa: E402

from privtune.eval.provenance import run_provenance  # noqa: E402

TASKS = ("bbc_news", "tweets")
# series label -> the ablation arms whose rows hold that stage 1, in order of preference for one seed
SERIES = {
    "(d) ScaleOT, 100 steps": ("a_d", "e", "b", "akd100", "akd300", "akd1000"),
    "(d) ScaleOT, 300 steps": ("d300",),
    "(d) ScaleOT, 1000 steps": ("d1000",),
    "(d) each step new owner text, 100 steps": ("dfresh",),
    "(d) each step new owner text, 300 steps": ("d300fresh",),
    "(g) relative reward, 100 steps": ("g",),
    "(c) identity stand-ins, 100 steps": ("c",),
    "(f) imitation only, 100 steps": ("f",),
    "(d) harmonizer lr 1e-4, 100 steps": ("dlr",),
    "(d) + imitation term, 100 steps": ("dim",),
}
# OT 2-13-2 + KD: the ``akd<N>`` rows distil OT's uniform drop in process beside ScaleOT; its curve (LM and KD per
# step) is the row's ``uniform_drop_distillation`` record of that arm (the row's ``stage1_curves`` are ScaleOT's)
KD_SERIES = {f"(a) OT 2-13-2 + KD, {n} steps": (f"akd{n}", f"ot_uniform_drop_2-13-2_kd{n}") for n in (100, 300, 1000)}
LOSS_PARTS = ("lm", "kd", "imitation")  # the parts of the owner's loss a row may carry beside the total
WINDOW = 10  # steps averaged for the loss at the start and at the end of stage 1
# leave-one-out importance measured on tweets, the owner's corpus of the BBC News rows (stage 1 of the default config)
LOO = {"bbc_news": "benchmarks/results/offsite_loo_importance/loo.json"}


def series_rows(rows_dir: Path, task: str) -> dict[str, list[dict[str, Any]]]:
    """Per series, the curves of each seed's preferred row (rows without them are skipped)."""
    found: dict[str, list[dict[str, Any]]] = {}
    wanted = {label: [(arm, None) for arm in arms] for label, arms in SERIES.items()}
    wanted |= {label: [row_arm] for label, row_arm in KD_SERIES.items()}
    for label, sources in wanted.items():
        seeds: dict[int, dict[str, Any]] = {}
        for row, arm in sources:
            for path in sorted((rows_dir / task).glob(f"{row}_seed*.json")):
                seed = int(path.stem.rsplit("_seed", 1)[1])
                report = json.loads(path.read_text())
                if arm is None:
                    curves = report.get("stage1_curves")
                else:
                    record = report.get("uniform_drop_distillation", {}).get(arm)
                    curves = {"loss": record["curve"]} if record else None
                if seed not in seeds and curves:
                    scores = report.get("meta", {}).get("layer_importance") if arm is None else None
                    seeds[seed] = {"seed": seed, "row": path.name, "layer_importance": scores, **curves}
        if seeds:
            found[label] = [seeds[s] for s in sorted(seeds)]
    return found


def _error_at(curves: dict[str, Any], index: int) -> list[float]:
    error = curves["harmonizer_error"]
    return [values[index] for block, values in error.items() if block != "step"]


def error_summary(curves: dict[str, Any]) -> dict[str, float] | None:
    """First and last record of one stage 1's harmonizer errors: median, share worse than a drop, worst block."""
    if "harmonizer_error" not in curves:
        return None
    first, last = _error_at(curves, 0), _error_at(curves, -1)
    return {
        "first_step": curves["harmonizer_error"]["step"][0],
        "last_step": curves["harmonizer_error"]["step"][-1],
        "median_first": statistics.median(first),
        "median_last": statistics.median(last),
        "worse_than_drop_first": sum(e > 1.0 for e in first) / len(first),
        "worse_than_drop_last": sum(e > 1.0 for e in last) / len(last),
        "max_last": max(last),
    }


def loss_summary(curves: dict[str, Any]) -> dict[str, float] | None:
    """The owner's loss (and its LM / KD / imitation parts where logged) averaged over the first and the last
    ``WINDOW`` steps."""
    loss = curves.get("loss")
    if not loss or len(loss["step"]) < 2 * WINDOW:
        return None
    out = {}
    for part in ("loss", *LOSS_PARTS):
        if part in loss:
            out[f"{part}_first"] = statistics.mean(loss[part][:WINDOW])
            out[f"{part}_last"] = statistics.mean(loss[part][-WINDOW:])
    return out


def importance_vs_loo(scores: dict[str, float] | None, loo: dict[str, Any] | None) -> dict[str, float] | None:
    """A row's learned scores against leave-one-out importance: Spearman and the overlap of the replaced halves.

    ``loo``: :mod:`offsite_loo_importance`'s result (each block's LM loss on the owner's corpus with the block
    dropped, and the base loss). The replaced half is the ``n // 2`` lowest-scored blocks (α = 0.5).
    """
    if not scores or not loo:
        return None
    middle = sorted(int(i) for i in scores)
    rl = [scores[str(i)] for i in middle]
    drop = [loo["rows"][str(i)]["dropped"] - loo["base_loss"] for i in middle]
    half = len(middle) // 2
    low_rl = {middle[i] for i in sorted(range(len(middle)), key=lambda i: rl[i])[:half]}
    low_loo = {middle[i] for i in sorted(range(len(middle)), key=lambda i: drop[i])[:half]}
    return {"spearman": spearman(rl, drop), "overlap": len(low_rl & low_loo), "half": half}


def _mean_sd(xs: list[float], fmt: str = "{:.2f}", sd_fmt: str | None = None) -> str:
    """``mean ± std`` (``fmt`` for the mean, ``sd_fmt`` or ``fmt`` for the spread); one value alone; none: –."""
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {(sd_fmt or fmt).format(statistics.stdev(xs))}"


def summarise(rows_dir: Path, loo: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per task and series: the seeds' rows and their error, loss and (with ``loo[task]``) importance summaries."""
    loo = loo or {}
    return {
        task: {
            label: [
                {
                    "seed": r["seed"], "row": r["row"], "error": error_summary(r), "loss": loss_summary(r),
                    "importance_vs_loo": importance_vs_loo(r.get("layer_importance"), loo.get(task)),
                }
                for r in rows
            ]
            for label, rows in series_rows(rows_dir, task).items()
        }
        for task in TASKS
    }  # fmt: skip


def _table_rows(summary: dict[str, Any], key: str, cells: Callable[[list[dict[str, Any]]], list[str]]) -> list[str]:
    """One table line per task and series that has ``key`` on some seed: task, series, n, then ``cells``."""
    lines = []
    for task, series in summary.items():
        for label, rows in series.items():
            found = [r[key] for r in rows if r.get(key)]
            if found:
                lines.append(f"| {task} | {label} | {len(found)} | " + " | ".join(cells(found)) + " |")
    return lines


def _error_cells(errors: list[dict[str, float]]) -> list[str]:
    return [
        _mean_sd([e["median_first"] for e in errors]),
        _mean_sd([e["median_last"] for e in errors]),
        _mean_sd([100 * e["worse_than_drop_first"] for e in errors], "{:.0f}%"),
        _mean_sd([100 * e["worse_than_drop_last"] for e in errors], "{:.0f}%"),
        _mean_sd([e["max_last"] for e in errors]),
    ]


def _loss_cells(losses: list[dict[str, float]]) -> list[str]:
    cells = [_mean_sd([loss[f"loss_{end}"] for loss in losses], "{:.3f}") for end in ("first", "last")]
    for part in LOSS_PARTS:
        if all(f"{part}_first" in loss for loss in losses):
            first, last = (_mean_sd([loss[f"{part}_{end}"] for loss in losses], "{:.3f}") for end in ("first", "last"))
            cells.append(f"{first} → {last}")
        else:
            cells.append("–")
    return cells


def _importance_cells(found: list[dict[str, float]]) -> list[str]:
    rho = _mean_sd([f["spearman"] for f in found], "{:+.2f}", "{:.2f}")
    return [rho, f"{_mean_sd([f['overlap'] for f in found], '{:.1f}')} of {found[0]['half']}"]


def markdown(summary: dict[str, Any], rows_rel: str, prov: dict[str, str] | None = None) -> str:
    """The two tables (harmonizer error, owner's loss), mean ± std over seeds, per task and series."""
    lines = [
        f"The model owner's stage 1 in the offsite ablation's rows (`{rows_rel}`), mean ± std over the seeds whose row "
        "recorded it (n). Harmonizer error: each harmonizer's normalised error against its block, "
        "`||H(h_in) - h_out||^2 / ||h_out - h_in||^2` on the step's held-out batch (1.0 = dropping the block); "
        "median over the 26 middle blocks and the share of them above 1 (worse than a plain drop), at the first "
        "record (after the warm start) and the last.",
        "",
        "| task | stage 1 | n | median error, first | median error, last | share > 1, first | share > 1, last | "
        "worst block, last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += _table_rows(summary, "error", _error_cells)
    lines += [
        "",
        f"The owner's training loss, mean of the first and of the last {WINDOW} steps (ScaleOT: the LM loss of the "
        "model with a sampled replaced set; with the imitation term: LM + λ_im·imitation, the mean normalised error "
        "of every harmonizer against its block; OT + KD: λ_lm·LM + λ_kd·KD; each with its parts).",
        "",
        "| task | stage 1 | n | loss, first | loss, last | LM, first → last | KD, first → last | "
        "imitation, first → last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += _table_rows(summary, "loss", _loss_cells)
    importance = _table_rows(summary, "importance_vs_loo", _importance_cells)
    if importance:
        lines += [
            "",
            "Each stage 1's learned layer scores against leave-one-out importance measured on the same owner's corpus "
            f"({', '.join(f'`{path}`' for path in LOO.values())}: each middle block dropped alone, the LM loss "
            "increase): Spearman correlation, and how many of the half the scores replace (α = 0.5) leave-one-out "
            "would replace too (a random half shares about half).",
            "",
            "| task | stage 1 | n | Spearman vs leave-one-out | replaced halves in common |",
            "|---|---|---|---|---|",
            *importance,
        ]
    prov = prov or run_provenance()
    lines += ["", f"Written by `{prov['command']}` at commit {prov['commit']}, {prov['date_utc']}."]
    return "\n".join(lines) + "\n"


def plot(rows_dir: Path, path: Path) -> Path | None:
    """``curves.png``: per task, the median harmonizer error and the owner's loss against the step; None without
    matplotlib. Each line is one series' mean over its seeds (loss: a ``WINDOW``-step moving average)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(TASKS), 2, figsize=(11, 3.6 * len(TASKS)), squeeze=False)
    for (ax_err, ax_loss), task in zip(axes, TASKS):
        for label, rows in series_rows(rows_dir, task).items():
            with_error = [r for r in rows if "harmonizer_error" in r]
            if with_error:
                steps = with_error[0]["harmonizer_error"]["step"]
                same = [r for r in with_error if r["harmonizer_error"]["step"] == steps]
                medians = [statistics.mean(statistics.median(_error_at(r, i)) for r in same) for i in range(len(steps))]
                ax_err.plot(steps, medians, marker=".", label=f"{label} (n={len(same)})")
            with_loss = [r for r in rows if r.get("loss")]
            if with_loss:
                length = min(len(r["loss"]["loss"]) for r in with_loss)
                mean = [statistics.mean(r["loss"]["loss"][i] for r in with_loss) for i in range(length)]
                smooth = [statistics.mean(mean[max(0, i - WINDOW + 1) : i + 1]) for i in range(length)]
                ax_loss.plot(with_loss[0]["loss"]["step"][:length], smooth, label=f"{label} (n={len(with_loss)})")
        ax_err.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax_err.set_title(f"{task}: median harmonizer error (1 = layer drop)")
        ax_err.set_xlabel("stage-1 step")
        ax_loss.set_title(f"{task}: model owner's loss ({WINDOW}-step average)")
        ax_loss.set_xlabel("stage-1 / distillation step")
        for ax in (ax_err, ax_loss):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="benchmarks/results/offsite_ablation", help="the ablation's result folder")
    parser.add_argument("--out", default="benchmarks/results/offsite_stage1_curves")
    parser.add_argument("--docs", nargs="*", default=[], help="Markdown files with an offsite-stage1-curves block")
    args = parser.parse_args(argv)
    prov = run_provenance()  # before anything is written, so a clean checkout is recorded as clean
    rows_dir, out = Path(args.rows), Path(args.out)
    if not rows_dir.is_dir():
        parser.error(f"--rows {rows_dir}: not a folder; give the offsite ablation's result folder")
    out.mkdir(parents=True, exist_ok=True)
    loo = {task: json.loads((ROOT / path).read_text()) for task, path in LOO.items() if (ROOT / path).is_file()}
    summary = summarise(rows_dir, loo)
    rows_rel = rows_dir.resolve().relative_to(ROOT).as_posix() if rows_dir.resolve().is_relative_to(ROOT) else rows_dir
    (out / "curves.json").write_text(json.dumps({"series": summary, "provenance": prov}, indent=2, default=str) + "\n")
    (out / "curves.md").write_text(markdown(summary, str(rows_rel), prov))
    written = [str(out / "curves.json"), str(out / "curves.md")]
    picture = plot(rows_dir, out / "curves.png")
    if picture is not None:
        written.append(str(picture))
    if args.docs:
        from privtune.eval.includes import replace_block

        rel = out.resolve().relative_to(ROOT).as_posix()
        for doc in args.docs:
            replace_block(doc, "offsite-stage1-curves", (out / "curves.md").read_text(), [f"{rel}/curves.md", rel])
    print("\n".join(written))
    return written


if __name__ == "__main__":
    main()
