"""Offsite-tuning emulators side by side at (about) equal emulator size, on one task, in one process.

Arms (all with the same adapter blocks 0,1 and L-2,L-1, the same data, steps and learning rate):

* ``ot_drop``: Offsite-Tuning 2-k-2 uniform layer drop, no distillation (OT†; cannot be exported as an
  artifact because it ships original blocks, so it runs in process);
* ``ot_kd``: the same emulator distilled with the normalised KD loss on the owner's public corpus;
* ``scaleot``: ScaleOT stage 1 (with the harmonizer warm start) + emulator generation for (N_a=4, α, β, β_mlp);
* ``scaleot_kd``: the same stage-1 run's emulator, then distilled with the OT KD loss for ``--owner-steps``
  steps (``EmulatorExport(distill_steps=...)``; stage 1 runs once when both ScaleOT arms are asked for);
* ``gradot``: GradOT, training-free, over every middle block with rank/channel budgets.

Full zero-shot and full fine-tuning of the same blocks are measured once. Writes ``compare.json`` and
``compare.md`` under ``--out`` and prints the table.

Run::

    HF_HUB_OFFLINE=1 python benchmarks/offsite_compare.py --task tweets --out runs/offsite_compare
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl

from privtune.callbacks.layer_replace import LayerReplace
from privtune.callbacks.offsite_tuning import EmulatorExport
from privtune.datamodules import LMCorpus
from privtune.emulator import count_parameters, save_emulator_artifact
from privtune.eval.offsite_report import privacy_gap
from privtune.models import load_model
from privtune.modules.offsite_distill import EmulatorDistillation
from privtune.modules.offsite_importance import HarmonizerImportance
from privtune.recipes.offsite import NestedTrainers, OffsiteRecipe, PipelineSettings, make_datamodule


def _corpus(source: str, model: str) -> LMCorpus:
    # the owner's corpus of configs/default.yaml: 128 blocks of 64 tokens, batches of 4
    data = LMCorpus(
        source=source, block_size=64, max_train_blocks=128, max_val_blocks=48, batch_size=4, tokenizer=model
    )
    data.setup("fit")
    return data


def _owner_fit(module: pl.LightningModule, callbacks: list, steps: int, corpus: str, root: str, model: str) -> float:
    pl.seed_everything(0, verbose=False)
    data = _corpus(corpus, model)
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, default_root_dir=root,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="tweets", choices=["tweets", "bbc_news"])
    parser.add_argument("--corpus", default="bbc_news", help="the model owner's public LM corpus")
    parser.add_argument("--arms", default="ot_drop,ot_kd,scaleot,gradot")
    parser.add_argument("--emulator-layers", type=int, default=13)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=0.8)
    parser.add_argument("--beta-mlp", type=float, default=0.9)
    parser.add_argument("--rank-budget", type=float, default=0.45)
    parser.add_argument("--channel-budget", type=float, default=0.4)
    parser.add_argument("--owner-steps", type=int, default=30, help="stage-1 / distillation steps")
    parser.add_argument("--warm-start-batches", type=int, default=16, help="ScaleOT harmonizer warm start")
    parser.add_argument("--distill-lr", type=float, default=1e-4, help="OT / scaleot_kd distillation lr")
    parser.add_argument(
        "--kd-norm", choices=["global", "per_dim", "global+per_dim"], default="global", help="KD normalisation"
    )
    parser.add_argument("--steps", type=int, default=30, help="adapter-tuning steps")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train-size", type=int, default=240)
    parser.add_argument("--val-size", type=int, default=16)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--out", default="runs/offsite_compare")
    args = parser.parse_args()

    out = Path(args.out)
    settings = PipelineSettings(
        output_dir=str(out), task=args.task, train_size=args.train_size, val_size=args.val_size,
        test_size=args.test_size, batch_size=args.batch_size, max_steps=args.steps, lr=args.lr,
    )  # fmt: skip
    data = make_datamodule(settings, args.model)
    recipe = OffsiteRecipe(settings, NestedTrainers.auto(str(out)))
    rows: dict[str, dict] = {}
    if not args.skip_baselines:
        zs, ft, timer = recipe.full_model(args.model, data, [0, 1, -2, -1])
        rows["full_zs"], rows["ft"] = zs, ft | {"step_s": timer.mean}
    full_params = count_parameters(load_model(args.model))
    stage1: tuple[HarmonizerImportance, float] | None = None
    for arm in args.arms.split(","):
        owner_s, emu_dir, layers = 0.0, str(out / arm / "emulator"), None
        if arm == "ot_drop":
            emu_dir, layers = None, args.emulator_layers
        elif arm == "ot_kd":
            module = EmulatorDistillation(
                args.model, emulator_layers=args.emulator_layers, kd_norm=args.kd_norm, lr=args.distill_lr
            )
            owner_s = _owner_fit(module, [EmulatorExport(emu_dir)], args.owner_steps, args.corpus, str(out), args.model)
        elif arm in ("scaleot", "scaleot_kd"):
            if stage1 is None:
                module = HarmonizerImportance(args.model, lr=1e-3)
                replace = LayerReplace(
                    2, 2, harmonizer_rank=64, log_scores=False, warm_start_batches=args.warm_start_batches
                )
                stage1 = module, _owner_fit(module, [replace], args.owner_steps, args.corpus, str(out), args.model)
            module, owner_s = stage1
            steps = args.owner_steps if arm == "scaleot_kd" else 0
            export = EmulatorExport(
                emu_dir, 4, args.alpha, args.beta, args.beta_mlp, steps, args.distill_lr, args.kd_norm
            )
            start = time.perf_counter()
            emulator, plan, original = export.build(module)
            export.distill(_corpus(args.corpus, args.model).train_dataloader(), emulator, plan, original)
            save_emulator_artifact(emu_dir, emulator.cpu(), plan, original.cpu())
            owner_s += time.perf_counter() - start
        elif arm == "gradot":
            module = EmulatorDistillation(
                args.model, emulator_layers=None, method="gradot", rank_budget=args.rank_budget,
                channel_budget=args.channel_budget, calib_batches=4,
            )  # fmt: skip
            owner_s = _owner_fit(module, [EmulatorExport(emu_dir)], 0, args.corpus, str(out), args.model)
        else:
            raise ValueError(f"unknown arm {arm!r}")
        res = recipe.tune_emulator_and_plug_in(args.model, emu_dir, str(out / arm / "adapters"), data, layers, arm=arm)
        rows[arm] = {
            "emulator_zs": res["emulator_zs"]["acc"],
            "emulator_ft": res["emulator_ft"]["acc"],
            "plug_in": res["plug_in"]["acc"],
            "plug_in_f1": res["plug_in"]["f1"],
            "gap": privacy_gap(res["plug_in"]["acc"], res["emulator_ft"]["acc"]),
            "emulator_params": res["emulator_params"],
            "params_ratio": res["emulator_params"] / full_params,
            "owner_seconds": owner_s,
            "step_s": res["step_emulator"],
        }
        print(arm, json.dumps(rows[arm]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = [
        "| emulator | params (vs full) | emulator ZS | emulator FT | plug-in | Δ | owner s | owner-step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in rows.items():
        if "gap" in r:
            size = f"{r['emulator_params'] / 1e6:.1f} M ({r['params_ratio']:.2f})"
            accs = " | ".join(f"{100 * r[k]:.1f}" for k in ("emulator_zs", "emulator_ft", "plug_in"))
            cost = f"{r['owner_seconds']:.0f} | {r['step_s']:.2f}"
            lines.append(f"| {arm} | {size} | {accs} | {r['gap']:+.1f} | {cost} |")
    for name in ("full_zs", "ft"):
        if name in rows:
            lines.append(
                f"| {name} | 1.00 | | | {100 * rows[name]['acc']:.1f} | | | {rows[name].get('step_s', 0):.2f} |"
            )
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
