"""ScaleOT's RL layer importance against directly measured leave-one-out importance, on the owner's corpus.

ScaleOT (arXiv 2412.09812) learns one importance score per middle layer by REINFORCE and replaces the least
important half by harmonizers. At 135 M parameters the measurement it approximates is cheap: drop each of the 30
blocks in turn (an identity in its place) and measure the LM loss on the model owner's corpus. This script

1. runs ScaleOT's stage 1 exactly as a YAML config describes it (by default ScaleOT's published-recipe config,
   ``configs/offsite_tuning/scaleot_pipeline_smollm2_bbc.yaml``, 100 steps, which was also the main job's when this
   ran: the model, the corpus and the ``LayerReplace`` callback; the config's export and pipeline callbacks are
   left out), through ``LightningCLI``, and keeps the learned scores and harmonizers;
2. measures the LM loss of the original model on the corpus's validation blocks, then with each block dropped
   (identity) and, for the middle blocks, replaced by its trained harmonizer;
3. reports the Spearman rank correlation between the RL scores and the leave-one-out loss increase, and the overlap
   of the two "least important half" sets (the blocks an α = 0.5 emulator replaces).

Resumable per row: each measured block is written to ``loo.json`` as it lands; a rerun with the same command skips
what is there (stage 1 is not rerun: its scores and harmonizers are saved under ``--work``).

Run::

    HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/offsite_loo_importance.py \
        --config configs/offsite_tuning/scaleot_pipeline_smollm2_bbc.yaml \
        --out benchmarks/results/offsite_loo_importance
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

import privtune.callbacks  # noqa: F401  (registers the callbacks' import paths)
import privtune.datamodules  # noqa: F401
import privtune.modules  # noqa: F401
from privtune.callbacks.offsite_pipeline import OffsitePipeline
from privtune.callbacks.offsite_tuning import EmulatorExport
from privtune.emulator import install_switches, make_harmonizers, remove_switches, set_replace_mask
from privtune.emulator.measured_importance import corpus_loss
from privtune.eval.provenance import run_provenance
from privtune.models import get_blocks, load_model


def run_stage1(config: str, work: Path) -> dict[str, Any]:
    """ScaleOT stage 1 as ``config`` describes it; saves and returns the scores, harmonizers and val batches."""
    saved = work / "stage1.pt"
    if saved.is_file():
        return torch.load(saved, weights_only=True)
    cli = LightningCLI(
        subclass_mode_model=True, subclass_mode_data=True, run=False, save_config_callback=None,
        args=["--config", config, "--trainer.enable_progress_bar=false"],
    )  # fmt: skip
    trainer, module = cli.trainer, cli.model
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, (EmulatorExport, OffsitePipeline))]
    start = time.perf_counter()
    trainer.fit(module, datamodule=cli.datamodule)
    middle = sorted(int(k) for k in module.harmonizers)
    state = {
        "model_name": module.model_name,
        "middle": torch.tensor(middle),
        "scores": module.layer_importance.detach().cpu().clone(),
        "harmonizers": {k: v.detach().cpu().clone() for k, v in module.harmonizers.state_dict().items()},
        "val": [{k: v.cpu() for k, v in b.items()} for b in cli.datamodule.val_dataloader()],
        "stage1_seconds": torch.tensor(time.perf_counter() - start),
    }
    work.mkdir(parents=True, exist_ok=True)
    torch.save(state, saved)
    return state


def loss_with_block_replaced(
    model: nn.Module, index: int, stand_in: nn.Module, batches: list[dict[str, torch.Tensor]]
) -> float:
    """LM loss with block ``index`` replaced by ``stand_in`` (a harmonizer; a fresh one is the identity)."""
    switches = install_switches(model, {str(index): stand_in})
    try:
        set_replace_mask(switches, {index: False})
        return corpus_loss(model, batches)
    finally:
        remove_switches(model)


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n (ties get their mean rank)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of ``a`` and ``b``."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", default="configs/offsite_tuning/scaleot_pipeline_smollm2_bbc.yaml", help="the stage-1 config"
    )
    parser.add_argument("--eval-blocks", type=int, default=24, help="validation blocks of the corpus measured")
    parser.add_argument("--work", default="runs/offsite_loo_importance", help="stage-1 state (not committed)")
    parser.add_argument("--out", default="benchmarks/results/offsite_loo_importance")
    args = parser.parse_args()

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "loo.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    state = run_stage1(args.config, work)
    middle = [int(i) for i in state["middle"]]
    scores = {str(i): float(s) for i, s in zip(middle, state["scores"])}
    batches = state["val"]
    n_blocks = sum(len(b["input_ids"]) for b in batches)
    keep, seen = [], 0
    for batch in batches:
        if seen >= args.eval_blocks:
            break
        keep.append(batch)
        seen += len(batch["input_ids"])
    model = load_model(state["model_name"]).eval()
    hidden = model.config.hidden_size
    rank = int(state["harmonizers"][f"{middle[0]}.down.weight"].shape[0])
    trained = make_harmonizers(hidden, middle, rank)
    trained.load_state_dict(state["harmonizers"])

    result.setdefault("provenance", run_provenance())
    result |= {
        "config": args.config,
        "model": state["model_name"],
        "stage1_seconds": float(state["stage1_seconds"]),
        "eval_blocks": seen,
        "available_val_blocks": n_blocks,
        "rl_scores": scores,
        "note": "measured on a shared machine (2 cores); the losses do not depend on the load",
    }
    rows: dict[str, dict[str, float]] = result.setdefault("rows", {})
    if "base_loss" not in result:
        result["base_loss"] = corpus_loss(model, keep)
        path.write_text(json.dumps(result, indent=2))
    for index in range(len(get_blocks(model))):
        if str(index) in rows:
            continue
        start = time.perf_counter()
        row = {
            "dropped": loss_with_block_replaced(model, index, make_harmonizers(hidden, [index], rank)[str(index)], keep)
        }
        if index in middle:
            row["harmonizer"] = loss_with_block_replaced(model, index, trained[str(index)], keep)
        row["seconds"] = time.perf_counter() - start
        rows[str(index)] = row
        path.write_text(json.dumps(result, indent=2))
        print(f"block {index}: " + json.dumps(row), flush=True)

    base = result["base_loss"]
    loo = [rows[str(i)]["dropped"] - base for i in middle]
    rl = [scores[str(i)] for i in middle]
    half = len(middle) // 2
    rl_low = {middle[i] for i in sorted(range(len(middle)), key=lambda i: rl[i])[:half]}
    loo_low = {middle[i] for i in sorted(range(len(middle)), key=lambda i: loo[i])[:half]}
    harm_gain = [rows[str(i)]["dropped"] - rows[str(i)]["harmonizer"] for i in middle]
    result["summary"] = {
        "spearman_rl_vs_loo": spearman(rl, loo),
        "replaced_half_rl": sorted(rl_low),
        "replaced_half_loo": sorted(loo_low),
        "overlap_of_replaced_halves": len(rl_low & loo_low),
        "half": half,
        "harmonizer_beats_identity": sum(g > 0 for g in harm_gain),
        "mean_loss_recovered_by_harmonizer": sum(harm_gain) / len(harm_gain),
    }
    path.write_text(json.dumps(result, indent=2))
    lines = [
        f"LM loss on {seen} validation blocks of the owner's corpus ({args.config}); base {base:.4f}.",
        "",
        "| block | RL score | loss, block dropped (Δ) | loss, trained harmonizer (Δ) |",
        "|---|---|---|---|",
    ]
    for index in range(len(get_blocks(model))):
        r = rows[str(index)]
        harmonizer = f"{r['harmonizer']:.4f} ({r['harmonizer'] - base:+.4f})" if "harmonizer" in r else ""
        score = f"{scores[str(index)]:+.4f}" if str(index) in scores else "adapter"
        lines.append(f"| {index} | {score} | {r['dropped']:.4f} ({r['dropped'] - base:+.4f}) | {harmonizer} |")
    s = result["summary"]
    lines += [
        "",
        f"Spearman(RL score, leave-one-out Δ) over the {len(middle)} middle blocks: {s['spearman_rl_vs_loo']:+.3f}. "
        f"The α = 0.5 replaced halves share {s['overlap_of_replaced_halves']} of {half} blocks "
        f"(RL {s['replaced_half_rl']}, leave-one-out {s['replaced_half_loo']}). The trained harmonizer beats the "
        f"identity on {s['harmonizer_beats_identity']} of {len(middle)} blocks (mean loss recovered "
        f"{s['mean_loss_recovered_by_harmonizer']:+.4f}).",
    ]
    (out / "loo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
