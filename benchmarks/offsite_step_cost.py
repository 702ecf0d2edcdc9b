"""Data-owner step time and peak memory: adapters tuned through an emulator vs inside the full model.

Each mode runs in its own subprocess (so ``ru_maxrss`` is that mode's peak resident memory): load the model
(or the emulator artifact), freeze everything but the adapter blocks 0, 1, L-2, L-1, and time ``--steps``
AdamW steps of label-word classification loss on random token batches of ``--batch`` x ``--length``. The
first step is warm-up and not counted. Prints one JSON line per mode and the ratio.

Run::

    HF_HUB_OFFLINE=1 python benchmarks/offsite_step_cost.py --emulator-dir runs/offsite_scaleot/emulator
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from privtune.eval.provenance import run_provenance


def _child(mode: str, model_name: str, emulator_dir: str | None, steps: int, batch: int, length: int) -> dict:
    import torch
    import torch.nn.functional as F

    from privtune.emulator import freeze_except_adapters, load_emulator_artifact, read_plan, uniform_drop_plan
    from privtune.models import load_model, num_blocks
    from privtune.models.scoring import label_word_logits

    torch.manual_seed(0)
    if mode == "emulator":
        model, plan = load_emulator_artifact(emulator_dir)
    else:
        model = load_model(model_name)
        depth = num_blocks(model)
        plan = read_plan(emulator_dir) if emulator_dir else uniform_drop_plan(depth, 2, 2, depth - 4)
        plan = uniform_drop_plan(
            depth, plan.adapter_bottom, plan.adapter_top, depth - plan.adapter_bottom - plan.adapter_top
        )
    params = freeze_except_adapters(model, plan)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, length))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 3, (batch,))
    label_ids = torch.tensor([100, 200, 300])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = F.cross_entropy(label_word_logits(model, ids, mask, label_ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "step_s": sum(times[1:]) / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "trainable": sum(p.numel() for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--emulator-dir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--child", choices=["emulator", "full"])
    parser.add_argument("--out", default=None, help="JSON result file (command, commit, date, load recorded)")
    parser.add_argument("--note", default="", help="e.g. 'measured on a shared machine'")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.emulator_dir, args.steps, args.batch, args.length)))
        return
    rows = {}
    for mode in ("emulator", "full"):
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--emulator-dir", args.emulator_dir]
        cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[mode] = json.loads(out)
        print(out, flush=True)
    ratio = {
        "step_time_ratio_emulator_over_full": rows["emulator"]["step_s"] / rows["full"]["step_s"],
        "peak_rss_ratio_emulator_over_full": rows["emulator"]["peak_rss_mb"] / rows["full"]["peak_rss_mb"],
        "params_ratio": rows["emulator"]["params"] / rows["full"]["params"],
    }
    print(json.dumps(ratio))
    if args.out:
        result = run_provenance() | {"args": vars(args), "rows": rows, **ratio, "loadavg": os.getloadavg()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result | {"note": args.note}, indent=2) + "\n")


if __name__ == "__main__":
    main()
