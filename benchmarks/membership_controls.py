"""Validity controls of the membership-inference attacks on a real model (SmolLM2-135M-Instruct).

* **Positive control**: a deliberately overfit non-private model, full fine-tuning for ``--epochs`` epochs on
  ``--members`` examples; every attack whose AUC interval excludes 0.5 passes.
* **Negative control**: the held-out non-members split in two halves by seed and scored one against the other
  with the same tuned model; an attack passes when its AUC interval contains 0.5.
* **Untuned model** (sanity): members against non-members under the base model, which never saw either.

An attack is valid (usable on other models, e.g. by a frontier script) only if both controls pass
(:func:`privtune.attacks.membership.control_verdicts`). The run trains through Lightning with the
:class:`~privtune.callbacks.MembershipAudit` callback, so the callback is what is tested.

Run (one seed, about 10-20 min on 2 shared cores):

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/membership_controls.py \\
        --out benchmarks/results/membership_controls
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from privtune.attacks.membership import MembershipReport, control_verdicts, membership_report
from privtune.callbacks import MembershipAudit
from privtune.datamodules import BBCNews, TweetsSentiment
from privtune.modules import TextClassifier

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/membership_controls")
    parser.add_argument("--dataset", choices=("bbc", "tweets"), default="bbc")
    parser.add_argument("--members", type=int, default=200, help="training examples (all are audited as members)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    pl.seed_everything(args.seed)
    cls = BBCNews if args.dataset == "bbc" else TweetsSentiment
    dm = cls(train_size=args.members, val_size=16, test_size=args.members, max_length=args.max_length,
             batch_size=args.batch_size, eval_batch_size=16, seed=args.seed)  # fmt: skip
    module = TextClassifier(model=MODEL, tuning="full", lr=args.lr)
    audit = MembershipAudit(nonmember_split="test", max_examples=args.members, seed=args.seed, draws=args.draws,
                            output_dir=str(out / "audit"))  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[audit])  # fmt: skip
    start = time.perf_counter()
    cpu_start = time.process_time()
    log(f"full fine-tuning of {MODEL} on {args.members} {args.dataset} examples for {args.epochs} epochs")
    trainer.fit(module, datamodule=dm)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tuned = MembershipReport.from_dict(audit.report)
    ref = audit.reference_statistics
    untuned = membership_report(ref["member"], ref["nonmember"], draws=args.draws, seed=args.seed)
    verdicts = control_verdicts(tuned)
    test_acc = module.evaluate(dm.test_dataloader(), desc="test")["acc"] if hasattr(module, "evaluate") else None
    meta = {
        "command": " ".join(shlex.quote(a) for a in [sys.argv[0].replace(str(ROOT) + "/", ""), *sys.argv[1:]]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}",
        "model": MODEL,
        "regime": f"full fine-tuning, {args.epochs} epochs, {args.members} members, lr {args.lr}, "
        f"batch {args.batch_size}, max_length {args.max_length}, seed {args.seed}",
        "dataset": args.dataset,
        "train_steps": trainer.global_step,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "test_acc_non_members": test_acc,
    }
    result = {
        "meta": meta,
        "positive_control": tuned.to_dict()["attacks"],
        "negative_control": tuned.to_dict()["negative_control"],
        "untuned_model": untuned.to_dict()["attacks"],
        "verdicts": verdicts,
    }
    (out / "controls.json").write_text(json.dumps(result, indent=1))
    (out / "controls.md").write_text(markdown(result))
    log(f"written {out}/controls.json and controls.md")
    print(markdown(result))


def _cell(iv: dict) -> str:
    return f"{iv['value']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# Membership-inference controls on {meta['model']} ({meta['dataset']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Commit: `{meta['commit']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']}  ",
        f"Regime: {meta['regime']} ({meta['train_steps']} steps, {meta['wall_seconds']} s wall)",
        "",
        "AUC with its bootstrap 95 % interval (1,000 draws, members and non-members resampled separately).",
        "",
        "| attack | positive control: overfit model, AUC | TPR at 1 % FPR | TPR at 0.1 % FPR "
        "| negative control: non-members half vs half, AUC | untuned model, AUC | valid |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, pos in result["positive_control"].items():
        neg = result["negative_control"][name]
        base = result["untuned_model"].get(name)
        verdict = result["verdicts"][name]
        lines.append(
            f"| {name} | {_cell(pos['auc'])} | {_cell(pos['tpr@1%'])} | {_cell(pos['tpr@0.1%'])} "
            f"| {_cell(neg['auc'])} | {_cell(base['auc']) if base else '-'} "
            f"| {'yes' if verdict['valid'] else 'no: ' + verdict['reason']} |"
        )
    if meta.get("test_acc_non_members") is not None:
        lines += ["", f"Accuracy of the overfit model on the non-members: {meta['test_acc_non_members']:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
