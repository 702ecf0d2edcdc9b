"""ScaleOT's parts ablated at equal emulator size, over seeds and tasks, each row a ``train.py`` run of a YAML config.

Issue: at SmolLM2-135M, OT's plain uniform drop gives a better plug-in than ScaleOT. Each arm below isolates one of
ScaleOT's parts (arXiv 2412.09812) against Offsite-Tuning's uniform drop (arXiv 2302.04870), at about 0.66 of the
parameters. Every row is ``python train.py fit --config <row>.yaml``, where ``<row>.yaml`` is ``configs/default.yaml``
(ScaleOT stage 1 + export + the five-setting pipeline) with only the row's differences written in: the task, the
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
* ``akd100``, ``akd300``, ``akd1000``: OT 2-13-2 distilled with OT's KD objective for 100 / 300 / 1000 steps on the
  owner's corpus (``configs/offsite_tuning/ot_distill_smollm2.yaml``'s model), then the same pipeline.

Resumable per (arm, seed, task) row: a row whose result file exists is skipped, so rerunning the same command
continues where it stopped. Each result (the row's report: five settings, arms, sizes, stage times, command,
commit, date) lands in ``--out/<task>/<arm>_seed<seed>.json``; ``--commit`` commits each file as it lands.
``summary.md`` (mean ± std per arm and task) is rewritten after every row. Wall times are those of a shared
2-core machine unless the row says otherwise.

Run::

    HF_HUB_OFFLINE=1 nohup nice -n 5 python benchmarks/offsite_ablation.py --commit > runs/offsite_ablation.log &
    python benchmarks/offsite_ablation.py --summarise-only --docs docs/offsite_tuning.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privtune.eval.provenance import run_provenance  # noqa: E402

TASKS = {
    # task: (the owner's public corpus, tokens per example) -- as in the two pipeline configs
    "bbc_news": ("tweets", 96),
    "tweets": ("bbc_news", 64),
}
ARMS = ("a_d", "b", "c", "e", "f", "g", "h", "d300", "d1000", "akd100", "akd300", "akd1000")
EMULATOR_LAYERS = 13  # OT 2-13-2: about the ScaleOT emulator's 0.66 of the parameters (α = 0.5 of 26: 13 replaced)


def _callback(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith(name))


def row_config(base: dict[str, Any], arm: str, task: str, seed: int, root: Path) -> dict[str, Any]:
    """``configs/default.yaml`` with the row's differences: task, seed, folders, the arm's knobs."""
    config = copy.deepcopy(base)
    corpus, length = TASKS[task]
    folder = root / task / f"{arm}_seed{seed}"
    config["seed_everything"] = seed
    config["trainer"]["default_root_dir"] = str(folder)
    config["trainer"]["enable_progress_bar"] = False
    config["data"]["init_args"] |= {"source": corpus, "seed": seed}
    _callback(config, "EmulatorExport")["init_args"]["output_dir"] = str(folder / "emulator")
    pipeline = _callback(config, "OffsitePipeline")["init_args"]
    pipeline |= {"output_dir": str(folder), "task": task, "max_length": length, "seed": seed, "alphas": []}
    pipeline["uniform_drop_layers"] = EMULATOR_LAYERS if arm in ("a_d", "d300", "d1000") else None
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
    elif arm.startswith("akd"):
        config["trainer"]["max_steps"] = int(arm[3:])
        config["trainer"]["callbacks"] = [
            cb for cb in config["trainer"]["callbacks"] if not cb["class_path"].endswith("LayerReplace")
        ]
        config["model"] = {
            "class_path": "privtune.modules.offsite_distill.EmulatorDistillation",
            "init_args": {
                "model": base["model"]["init_args"]["model"], "adapter_bottom": 2, "adapter_top": 2,
                "emulator_layers": EMULATOR_LAYERS, "method": "uniform_drop", "lm_weight": 1.0, "kd_weight": 30.0,
                "lr": 1e-4,
            },
        }  # fmt: skip
    elif arm != "a_d":
        raise ValueError(f"unknown arm {arm!r}; runnable: {ARMS}")
    return config


def _mean_sd(xs: list[float]) -> str:
    """``mean ± std`` (one value: the value alone, no spread to show)."""
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def summarise(out: Path) -> str:
    """Mean ± std per task and arm over the rows that have landed."""
    lines = [
        "Accuracy in %, mean ± std over the seeds that have landed (n). Each row a `train.py` run of the default "
        "config with the arm's knobs; measured on a shared machine (wall times not comparable). The last column "
        "pairs each seed's plug-in with OT uniform drop's on the same split (its `a_d` row) and averages the "
        "differences.",
        "",
        "| task | arm | n | full ZS | full FT | emulator ZS | emulator FT | plug-in | Δ | params ratio | "
        "plug-in − OT uniform drop's, same seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
        ot = {v["seed"]: v["plug_in"] for v in rows.get(ot_key, [])}
        for key, values in rows.items():
            cells = []
            for metric in ("full_zs", "ft", "emulator_zs", "emulator_ft", "plug_in", "gap"):
                cells.append(_mean_sd([v[metric] for v in values]))
            # paired with OT's uniform drop on the seeds both have (the a_d rows hold it), so that arms with fewer
            # seeds are not compared against a mean over other splits
            diffs = [v["plug_in"] - ot[v["seed"]] for v in values if v["seed"] in ot]
            paired = "—" if key == ot_key or not diffs else _mean_sd(diffs)
            lines.append(
                f"| {task} | {key} | {len(values)} | " + " | ".join(cells) + f" | {values[0]['params_ratio']:.3f} | "
                f"{paired} |"
            )
    prov = run_provenance()
    lines += ["", f"Written by `{prov['command']}` at commit {prov['commit']}, {prov['date_utc']}."]
    return "\n".join(lines) + "\n"


def commit(paths: list[str], message: str) -> None:
    """Commit only ``paths`` (retrying while another commit holds the index lock)."""
    for _ in range(5):
        added = subprocess.run(["git", "add", *paths], check=False, capture_output=True)
        done = added.returncode == 0 and (
            subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], check=False).returncode == 0
        )
        if done:
            return
        time.sleep(2)
    print(f"could not commit {paths}; commit them by hand", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help=f"runnable: {ARMS}")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="runs/offsite_ablation", help="row configs, artifacts, logs")
    parser.add_argument("--out", default="benchmarks/results/offsite_ablation")
    parser.add_argument("--commit", action="store_true", help="git-commit each result file as it lands")
    parser.add_argument("--summarise-only", action="store_true", help="only rewrite summary.md from the rows")
    parser.add_argument("--docs", nargs="*", default=[], help="Markdown files with an offsite-ablation block")
    args = parser.parse_args()
    refused = [a for a in args.arms if a not in ARMS]
    if refused:
        parser.error(f"--arms {refused}: unknown; runnable: {ARMS}")

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
                command = [sys.executable, "train.py", "fit", "--config", str(folder / "config.yaml")]
                start = time.perf_counter()
                load = os.getloadavg()
                with (folder / "train.log").open("w") as log:
                    code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
                if code != 0:
                    print(f"{task} {arm} seed {seed}: train.py exited {code}, see {folder / 'train.log'}", flush=True)
                    continue
                report = json.loads((folder / "offsite_report.json").read_text())
                report["row"] = {
                    "arm": arm, "task": task, "seed": seed, "config": config,
                    "train_command": " ".join(["python", *command[1:]]),
                    "wall_seconds": round(time.perf_counter() - start, 1), "loadavg_at_start": load,
                    "note": "measured on a shared machine",
                }  # fmt: skip
                result.parent.mkdir(parents=True, exist_ok=True)
                result.write_text(json.dumps(report, indent=2, default=str) + "\n")
                (out / "summary.md").write_text(summarise(out))
                print(f"{task} {arm} seed {seed}: " + json.dumps(report["arms"]), flush=True)
                if args.commit:
                    paths = [str(result), str(out / "summary.md")]
                    commit(
                        paths, f"Offsite ablation result: {task}, arm {arm}, seed {seed} (measured on a shared machine)"
                    )
    if args.summarise_only:
        (out / "summary.md").write_text(summarise(out))
    if args.docs:
        from privtune.eval.includes import replace_block

        rel = out.resolve().relative_to(ROOT).as_posix()
        for doc in args.docs:
            replace_block(doc, "offsite-ablation", (out / "summary.md").read_text(), [f"{rel}/summary.md", rel])


if __name__ == "__main__":
    main()
