"""ScaleOT's parts ablated at equal emulator size, over seeds and tasks, each row a ``train.py`` run of a YAML config.

Issue: at SmolLM2-135M, OT's plain uniform drop gives a better plug-in than ScaleOT. Each arm below isolates one of
ScaleOT's parts (arXiv 2412.09812) against Offsite-Tuning's uniform drop (arXiv 2302.04870), at about 0.66 of the
parameters. Every row is ``python train.py fit --config <row>.yaml``, where ``<row>.yaml`` is :data:`BASE_CONFIG`
(ScaleOT as published: stage 1 with trained harmonizers, export, the five-setting pipeline; the main job's config
before its defaults changed, so the rows stay reproducible) with only the row's differences written in: the task, the
seed (split, stage 1 and tuning), the output folders and the arm's knobs. Nothing is re-implemented here.

Arms (``--arms``):

* ``a_d``: ScaleOT (d) with OT's undistilled uniform drop 2-13-2 (a) beside it in the same run, on the same split.
* ``b``: uniform drop + harmonizers: the exported ScaleOT emulator's replaced set is the 13 blocks OT 2-13-2 drops
  (``EmulatorExport.replaced: uniform``), harmonizers from the same stage 1; beside it, owner side, the same emulator
  without SRC, i.e. exactly OT 2-13-2's kept blocks with harmonizers in the gaps (``scaleot_no_src``).
* ``c``: importance-chosen kept layers, identity in place of the replaced ones: stage 1 learns the scores with the
  harmonizers frozen at their identity initialisation (harmonizer lr 1e-12, no warm start).
* ``e``: ScaleOT without selective rank compression: beside ScaleOT (d), the same emulator (same stage 1, replaced
  set and harmonizers) with the original kept blocks put back, built and evaluated inside the run, never written
  (``OffsitePipeline.scaleot_no_src``; the artifact rule still refuses uncompressed kept blocks). Same size as (d):
  SRC stores its rank-β matrices dense, so α stays 0.5 (α = 0.6 would replace 16 blocks instead of 13).
* ``f``: ScaleOT with Dynamic LayerReplace off: the harmonizers are only warm-started, each on its own block
  (per-block fit, 16 batches), and not trained under sampled replacement sets (harmonizer lr 1e-12); the RL scores
  are still learned.
* ``g``: ScaleOT (d) with the relative importance reward (``LayerReplace.reward: relative``,
  :func:`privtune.emulator.importance.rewards`): the published reward ``exp(-L_j) - mean exp(-L_c)`` is about 0.0025
  times the loss gaps at SmolLM2's loss on the owner's corpus, so its scores stay at noise
  (``benchmarks/results/offsite_loo_importance``); everything else as (d).
* ``h``: ScaleOT (d) with measured importance (``EmulatorExport.importance: measured``,
  :func:`privtune.emulator.measured_importance.measured_importance`): the replaced half is the 13 blocks whose
  trained harmonizer, put alone in their place, raises the owner's LM loss least on 4 held-out batches; a block
  whose harmonizer is harmful is kept. Everything else as (d).
* ``d300``, ``d1000``: ScaleOT (d) with 300 / 1000 stage-1 steps instead of 100 (owner-budget scaling; with (a)).
* ``dfresh``, ``d300fresh``: ScaleOT (d) with 100 / 300 stage-1 steps where every step sees new owner text: the
  owner's corpus is capped at ``steps x batch size`` blocks (400 / 1200 of its ~17,900) instead of the config's 128,
  which 100 steps cycle three times and 300 steps nine times. Tests whether the harmonizers' drift away from their
  blocks (``benchmarks/results/offsite_stage1_curves``) is the small, repeated owner corpus.
* ``dlr``: ScaleOT (d) with the harmonizers' learning rate at 1e-4 instead of 1e-3 (everything else as (d), the
  per-block warm start included): between (d), whose LM-only training moves the harmonizers away from their blocks,
  and (f), which keeps them where the warm start put them.
* ``dim``: ScaleOT (d) with an imitation term beside stage 1's LM loss (``HarmonizerImportance(imitation_weight=1)``,
  :data:`IMITATION_WEIGHT`): every harmonizer's normalised error against its own block, from one extra forward of
  the original model per step, is added to the LM loss under Dynamic LayerReplace, so the harmonizers stay anchored
  to their blocks (as in (f)) while still being tuned in context (as in (d)). Everything else as (d).
* ``akd100``, ``akd300``, ``akd1000``: OT 2-13-2 distilled with OT's KD objective (λ_lm 1, λ_kd 30, lr 1e-4) for
  100 / 300 / 1000 steps on the owner's corpus, beside ScaleOT (d) in the same run
  (``OffsitePipeline(uniform_drop_distill_steps=N)``): distilled in process at the model owner and never exported,
  because after 100 steps at OT's learning rate (measured) its kept blocks are still within the leak check's 1 % of
  the originals, so the export refuses it (each row records the distance its distillation reached). The row's
  ScaleOT arm repeats (d)'s 100-step stage 1.

Resumable per (arm, seed, task) row, and inside a row: a row whose result file exists is skipped, and a row killed
during the model owner's stage 1 (the 1000-step rows take longer than a working session here) continues from the
last stage-1 checkpoint in its work folder (``stage1_checkpoints/last.ckpt``, every :data:`CHECKPOINT_EVERY`
steps, LayerReplace's scores and harmonizers and the owner's curves and seconds with it; ``train.py fit
--ckpt_path``), and a row killed in its OT distillation (the akd rows' longest stage) continues that from its last
state (every 50 steps, on the batches it started with; ``distillation_state/`` in the work folder), so rerunning the
same command continues where it stopped. A resumed row's report names the steps it resumed at
(``meta.stage1_resumed_at_steps``, and ``resumed_at_step`` in its distillation record); its CPU seconds are the
last run's only, so the owner-budget table leaves them out. Each result (the row's report: five settings, arms,
sizes, stage times, command, commit, date) lands in ``--out/<task>/<arm>_seed<seed>.json``; ``--commit`` commits
each file as it lands.
``summary.md`` (mean ± std per arm and task) is rewritten after every row, and so is the generated block of each
``--docs`` file (committed with the row), so that a guide never shows a table its result files no longer hold.
Wall times are those of a shared 2-core machine unless the row says otherwise.

Run::

    HF_HUB_OFFLINE=1 nohup nice -n 5 python benchmarks/offsite_ablation.py --commit --docs docs/offsite_tuning.md \\
        > runs/offsite_ablation.log &
    python benchmarks/offsite_ablation.py --summarise-only --docs docs/offsite_tuning.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privtune.callbacks.offsite_pipeline import STAGE1_SECONDS  # noqa: E402
from privtune.eval.provenance import commit_paths, run_provenance  # noqa: E402
from privtune.recipes.offsite import KEPT_ERROR_ROW  # noqa: E402

TASKS = {
    # task: (the owner's public corpus, tokens per example) -- as in the two pipeline configs
    "bbc_news": ("tweets", 96),
    "tweets": ("bbc_news", 64),
}
ARMS = (
    "a_d", "b", "c", "e", "f", "g", "h", "d300", "d1000", "akd100", "akd300", "akd1000", "dfresh", "d300fresh", "dlr",
    "dim",
)  # fmt: skip
IMITATION_WEIGHT = 1.0  # λ_im of the dim arm, fixed before its first row
BASE_CONFIG = "configs/offsite_tuning/scaleot_pipeline_smollm2_bbc.yaml"  # ScaleOT (d) as published
EMULATOR_LAYERS = 13  # OT 2-13-2: about the ScaleOT emulator's 0.66 of the parameters (α = 0.5 of 26: 13 replaced)
CHECKPOINT_EVERY = 50  # stage-1 steps between a row's checkpoints (a few MB each: harmonizers, scores, optimizer)
CHECKPOINTS = "stage1_checkpoints"


def _callback(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith(name))


def row_config(base: dict[str, Any], arm: str, task: str, seed: int, root: Path) -> dict[str, Any]:
    """:data:`BASE_CONFIG` with the row's differences: task, seed, folders, the arm's knobs."""
    config = copy.deepcopy(base)
    corpus, length = TASKS[task]
    folder = root / task / f"{arm}_seed{seed}"
    config["seed_everything"] = seed
    config["trainer"]["default_root_dir"] = str(folder)
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["enable_checkpointing"] = True  # a killed row resumes from its last stage-1 checkpoint
    config["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(folder / CHECKPOINTS), "every_n_train_steps": CHECKPOINT_EVERY, "save_last": True,
                "save_top_k": 0,
            },
        }
    )  # fmt: skip
    config["data"]["init_args"] |= {"source": corpus, "seed": seed}
    _callback(config, "EmulatorExport")["init_args"]["output_dir"] = str(folder / "emulator")
    pipeline = _callback(config, "OffsitePipeline")["init_args"]
    pipeline |= {"output_dir": str(folder), "task": task, "max_length": length, "seed": seed, "alphas": []}
    with_ot = arm in ("a_d", "d300", "d1000") or arm.startswith("akd")  # OT 2-13-2 beside ScaleOT in the run
    pipeline["uniform_drop_layers"] = EMULATOR_LAYERS if with_ot else None
    pipeline["title"] = f"ablation {arm}, {task}, seed {seed}"
    replace = _callback(config, "LayerReplace")["init_args"]
    export = _callback(config, "EmulatorExport")["init_args"]
    if arm == "b":
        export["replaced"] = "uniform"
        pipeline["scaleot_no_src"] = True
    elif arm == "e":
        pipeline["scaleot_no_src"] = True
    elif arm == "c":
        config["model"]["init_args"]["lr"] = 1e-12
        replace["warm_start_batches"] = 0
    elif arm == "f":
        config["model"]["init_args"]["lr"] = 1e-12
    elif arm == "g":
        replace["reward"] = "relative"
    elif arm == "h":
        export["importance"] = "measured"
    elif arm in ("d300", "d1000"):
        config["trainer"]["max_steps"] = int(arm[1:])
    elif arm == "dlr":
        config["model"]["init_args"]["lr"] = 1e-4
    elif arm == "dim":
        config["model"]["init_args"]["imitation_weight"] = IMITATION_WEIGHT
    elif arm in ("dfresh", "d300fresh"):
        steps = 300 if arm == "d300fresh" else config["trainer"]["max_steps"]
        config["trainer"]["max_steps"] = steps
        config["data"]["init_args"]["max_train_blocks"] = steps * config["data"]["init_args"]["batch_size"]
    elif arm.startswith("akd"):
        pipeline["uniform_drop_distill_steps"] = int(arm[3:])
    elif arm != "a_d":
        raise ValueError(f"unknown arm {arm!r}; runnable: {ARMS}")
    return config


def row_command(folder: Path) -> list[str]:
    """``train.py fit`` on the row's config, resumed from its last stage-1 checkpoint when a killed run left one."""
    command = [sys.executable, "train.py", "fit", "--config", str(folder / "config.yaml")]
    last = folder / CHECKPOINTS / "last.ckpt"
    return command + (["--ckpt_path", str(last)] if last.is_file() else [])


def _mean_sd(xs: list[float]) -> str:
    """``mean ± std`` (one value: the value alone, no spread to show)."""
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def summarise(out: Path) -> str:
    """Mean ± std per task and arm over the rows that have landed."""
    lines = [
        f"Accuracy in %, mean ± std over the seeds that have landed (n). Each row a `train.py` run of `{BASE_CONFIG}` "
        "(ScaleOT as published) with the arm's knobs; measured on a shared machine (wall times not comparable). The "
        "last four columns pair each seed's plug-in with OT uniform drop's, with ScaleOT (d)'s in its `a_d` row, "
        "with ScaleOT (d)'s again in its `e` row and in its `akd100` row, on the same split, and average the "
        "differences. ScaleOT's stage 1 is not reproducible across runs of the same config and seed (its sampled "
        "masks follow float rounding, which changes with the thread count, the machine and the code around it), so "
        "(d) has up to three runs here: the `a_d` rows ran first, the `e` rows (the same stage 1 as (d), one thread, "
        "like the arms run after them) give (d) again, and the `akd100` rows (one thread) give the `e` rows' run on "
        "BBC News and a third run on tweets (those rows ran on the slower machine of the later rows); OT's built, "
        "seeded drop is the same in every run.",
        "",
        "| task | arm | n | full ZS | full FT | emulator ZS | emulator FT | plug-in | Δ | params ratio | "
        "plug-in − OT uniform drop's, same seeds | plug-in − ScaleOT (d)'s (a_d rows), same seeds | "
        "plug-in − ScaleOT (d)'s (e rows), same seeds | plug-in − ScaleOT (d)'s (akd100 rows), same seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ot_key = f"a_d: ot_uniform_drop_2-{EMULATOR_LAYERS}-2"
    for task in TASKS:
        rows: dict[str, list[dict[str, float]]] = {}
        for path in sorted((out / task).glob("*.json")):
            report = json.loads(path.read_text())
            for name, arm in report["arms"].items():
                key = f"{path.stem.rsplit('_seed', 1)[0]}: {name}"
                rows.setdefault(key, []).append(
                    {
                        "full_zs": 100 * report["settings"]["full_zs"]["acc"],
                        "ft": 100 * report["settings"]["ft"]["acc"],
                        "emulator_zs": 100 * arm["emulator_zs"],
                        "emulator_ft": 100 * arm["emulator_ft"],
                        "plug_in": 100 * arm["plug_in"],
                        "gap": arm["gap"],
                        "params_ratio": arm["params_ratio"],
                        "seed": int(path.stem.rsplit("_seed", 1)[1]),
                    }
                )
        # paired with OT's uniform drop and with ScaleOT (d) on the seeds both have (the a_d rows hold both), so
        # that arms with fewer seeds are not compared against a mean over other splits
        baselines = [ot_key, "a_d: scaleot", "e: scaleot", "akd100: scaleot"]
        by_seed = {b: {v["seed"]: v["plug_in"] for v in rows.get(b, [])} for b in baselines}
        for key, values in rows.items():
            cells = []
            for metric in ("full_zs", "ft", "emulator_zs", "emulator_ft", "plug_in", "gap"):
                cells.append(_mean_sd([v[metric] for v in values]))
            for base in baselines:
                diffs = [v["plug_in"] - by_seed[base][v["seed"]] for v in values if v["seed"] in by_seed[base]]
                cells.append("—" if key == base or not diffs else _mean_sd(diffs))
            lines.append(
                f"| {task} | {key} | {len(values)} | "
                + " | ".join(cells[:6])
                + f" | {values[0]['params_ratio']:.3f} | "
                + " | ".join(cells[6:])
                + " |"
            )
    lines += budget_lines(out)
    prov = run_provenance()
    lines += ["", f"Written by `{prov['command']}` at commit {prov['commit']}, {prov['date_utc']}."]
    return "\n".join(lines) + "\n"


# Owner-budget scaling: which row and arm holds each (series, owner steps) point. Steps are the model owner's stage-1
# (ScaleOT) or distillation (OT + KD) steps; OT's undistilled uniform drop is the 0-step point of (a).
BUDGET_POINTS = {
    "(d) ScaleOT": {100: ("a_d", "scaleot"), 300: ("d300", "scaleot"), 1000: ("d1000", "scaleot")},
    "(a) OT 2-13-2 + KD": {
        0: ("a_d", f"ot_uniform_drop_2-{EMULATOR_LAYERS}-2"),
        **{n: (f"akd{n}", f"ot_uniform_drop_2-{EMULATOR_LAYERS}-2_kd{n}") for n in (100, 300, 1000)},
    },
}  # fmt: skip


def owner_budget(out: Path, task: str) -> dict[str, dict[int, list[dict[str, float]]]]:
    """Per series and owner steps, each landed seed's plug-in (%), the owner's wall seconds and the row's CPU seconds.

    The owner's seconds are ScaleOT's stage 1 (the row's ``stage_seconds``) or OT's in-process distillation (the
    row's ``uniform_drop_distillation``), 0 for OT's plain drop. The CPU seconds are the whole row's (``train.py``'s
    process, all five settings and every arm), recorded from the rows that carry them. ``kept_min_rel_error`` is
    the smallest relative error of a kept matrix to its original (the leak check refuses an export below 1e-2):
    ScaleOT's exported emulator's, the distilled drop's ``kept_closeness`` (NaN in rows from before either was
    recorded), 0 for the plain drop.
    """
    series: dict[str, dict[int, list[dict[str, float]]]] = {}
    for label, points in BUDGET_POINTS.items():
        for steps, (row, arm) in points.items():
            for path in sorted((out / task).glob(f"{row}_seed*.json")):
                report = json.loads(path.read_text())
                if arm not in report["arms"]:
                    continue
                distilled = report.get("uniform_drop_distillation", {})
                if arm in distilled:
                    owner = float(distilled[arm]["seconds"])
                    kept = float(distilled[arm].get("kept_closeness", {}).get("min_rel_error", float("nan")))
                elif arm == "scaleot":
                    owner = float(report["stage_seconds"].get(STAGE1_SECONDS, 0.0))
                    kept = float(report["emulator"].get(KEPT_ERROR_ROW, "nan–").split("–")[0])
                else:  # OT's undistilled drop: its kept blocks are the original blocks
                    owner, kept = 0.0, 0.0
                series.setdefault(label, {}).setdefault(steps, []).append(
                    {
                        "seed": int(path.stem.rsplit("_seed", 1)[1]),
                        "plug_in": 100 * report["arms"][arm]["plug_in"],
                        "stage1_seconds": owner,
                        # a resumed row's CPU seconds are its last run's only: left out
                        "cpu_seconds": float("nan")
                        if report.get("meta", {}).get("stage1_resumed_at_steps")
                        else float(report.get("row", {}).get("cpu_seconds", float("nan"))),
                        "kept_min_rel_error": kept,
                    }
                )
    return series


def budget_lines(out: Path) -> list[str]:
    """The owner-budget table: plug-in against the owner's steps, per task and series (points that have landed)."""
    lines = [
        "",
        "Owner budget: plug-in accuracy (%) against the model owner's stage-1 / distillation steps, mean ± std over "
        "the seeds that have landed (n); the owner's wall seconds (stage 1 or distillation) and the whole row's CPU "
        "seconds (where recorded), mean; the smallest relative error of a kept matrix to its original, mean (where "
        "recorded; the leak check refuses an export below 0.01). 0 steps: OT's undistilled uniform drop (the `a_d` "
        "rows).",
        "",
        "| task | series | owner steps | n | plug-in | owner wall s | row CPU s | kept matrices' min rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        for label, points in owner_budget(out, task).items():
            for steps, values in sorted(points.items()):
                cpu = [v["cpu_seconds"] for v in values if v["cpu_seconds"] == v["cpu_seconds"]]
                kept = [v["kept_min_rel_error"] for v in values if v["kept_min_rel_error"] == v["kept_min_rel_error"]]
                lines.append(
                    f"| {task} | {label} | {steps} | {len(values)} | {_mean_sd([v['plug_in'] for v in values])} | "
                    f"{statistics.mean(v['stage1_seconds'] for v in values):.0f} | "
                    f"{f'{statistics.mean(cpu):.0f}' if cpu else '–'} | "
                    f"{f'{statistics.mean(kept):.3f} (n={len(kept)})' if kept else '–'} |"
                )
    return lines


def plot_owner_budget(out: Path) -> Path | None:
    """``owner_budget.png``: plug-in against owner steps, one panel per task, mean ± std; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        for label, points in owner_budget(out, task).items():
            steps = sorted(points)
            means = [statistics.mean(v["plug_in"] for v in points[k]) for k in steps]
            sds = [statistics.stdev(v["plug_in"] for v in points[k]) if len(points[k]) > 1 else 0.0 for k in steps]
            ax.errorbar(steps, means, yerr=sds, marker="o", capsize=3, label=label)
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlabel("model owner's stage-1 / distillation steps")
        ax.set_ylabel("plug-in accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "owner_budget.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(out: Path) -> list[str]:
    """Rewrite ``summary.md`` and ``owner_budget.png`` from the rows that have landed; the paths written."""
    (out / "summary.md").write_text(summarise(out))
    plot = plot_owner_budget(out)
    return [str(out / "summary.md")] + ([str(plot)] if plot is not None else [])


def update_docs(out: Path, docs: list[str]) -> list[str]:
    """Rewrite the ``offsite-ablation`` block of each of ``docs`` from ``summary.md``; the paths it rewrote."""
    from privtune.eval.includes import replace_block

    try:
        rel = out.resolve().relative_to(ROOT).as_posix()
    except ValueError:  # a results folder outside the repository is cited as given
        rel = out.as_posix()
    for doc in docs:
        replace_block(doc, "offsite-ablation", (out / "summary.md").read_text(), [f"{rel}/summary.md", rel])
    return list(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=BASE_CONFIG, help="the base every row config is written from")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help=f"runnable: {ARMS}")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="runs/offsite_ablation", help="row configs, artifacts, logs")
    parser.add_argument("--out", default="benchmarks/results/offsite_ablation")
    parser.add_argument("--commit", action="store_true", help="git-commit each result file as it lands")
    parser.add_argument("--summarise-only", action="store_true", help="only rewrite summary.md from the rows")
    parser.add_argument(
        "--docs", nargs="*", default=[], help="Markdown files whose offsite-ablation block follows each row"
    )
    args = parser.parse_args()
    refused = [a for a in args.arms if a not in ARMS]
    if refused:
        parser.error(f"--arms {refused}: unknown; runnable: {ARMS}")
    for doc in args.docs:  # checked before any row runs: a row must not end on a guide it cannot update
        text = Path(doc).read_text() if Path(doc).is_file() else None
        if text is None or "<!-- offsite-ablation -->" not in text or "<!-- /offsite-ablation -->" not in text:
            parser.error(f"--docs {doc}: not a Markdown file with an <!-- offsite-ablation --> ... block")

    base = yaml.safe_load(Path(args.config).read_text())
    work, out = Path(args.work), Path(args.out)
    # seed-major order: every arm gets its first seed on both tasks before any arm gets a second
    for seed in [] if args.summarise_only else args.seeds:
        for task in args.tasks:
            for arm in args.arms:
                result = out / task / f"{arm}_seed{seed}.json"
                if result.is_file():
                    continue
                config = row_config(base, arm, task, seed, work)
                folder = Path(config["trainer"]["default_root_dir"])
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                command = row_command(folder)
                start = time.perf_counter()
                load = os.getloadavg()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                with (folder / "train.log").open("a") as log:  # a resumed row's log follows the killed run's
                    log.write(f"\n[offsite_ablation] {' '.join(command[1:])}\n")
                    log.flush()
                    code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                if code != 0:
                    print(f"{task} {arm} seed {seed}: train.py exited {code}, see {folder / 'train.log'}", flush=True)
                    continue
                report = json.loads((folder / "offsite_report.json").read_text())
                note = "measured on a shared machine"
                if "--ckpt_path" in command:
                    note += "; resumed from a stage-1 checkpoint: wall and CPU seconds are its last run's"
                report["row"] = {
                    "arm": arm, "task": task, "seed": seed, "config": config,
                    "train_command": " ".join(["python", *command[1:]]),
                    "wall_seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(cpu, 1),
                    "loadavg_at_start": load,
                    "note": note,
                }  # fmt: skip
                result.parent.mkdir(parents=True, exist_ok=True)
                result.write_text(json.dumps(report, indent=2, default=str) + "\n")
                shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)  # the row is done: nothing to resume
                written = write_summary(out) + update_docs(out, args.docs)
                print(f"{task} {arm} seed {seed}: " + json.dumps(report["arms"]), flush=True)
                if args.commit:
                    paths = [str(result), *written]
                    commit_paths(
                        paths, f"Offsite ablation result: {task}, arm {arm}, seed {seed} (measured on a shared machine)"
                    )
    if args.summarise_only:
        write_summary(out)
    update_docs(out, args.docs)


if __name__ == "__main__":
    main()
