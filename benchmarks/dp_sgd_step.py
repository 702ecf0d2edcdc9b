"""DP-SGD step time over the plain step: SmolLM2-135M-Instruct + LoRA, with Opacus' per-sample gradient modes.

One process, one model, one fixed batch of real tweets (the packaged TweetsSentiment data, encoded with the
classifier's prompt template), the classifier's loss (cross-entropy of the label words' logits). Each round runs
every mode for ``--steps`` timed steps (after ``--warmup`` untimed ones in the first round), modes interleaved so
that load from other processes on a shared machine falls on all of them alike; the reported ratio is the median
step time of a mode over the median plain step, and the ratio per round shows the spread. One torch thread by
default: on a loaded machine two threads wait on each other (a plain step took 75 s with 2 threads, 10 s with 1).

Modes (all clip to ``C = 1`` and add noise ``sigma = 1``; a timed step is zero_grad + forward + backward + step):

* ``plain``: AdamW on the LoRA parameters, no privacy.
* ``hooks``: what ``OpacusDP`` does: Opacus' ``GradSampleHooks`` (per-sample gradients from layer hooks) and
  ``DPOptimizer``.
* ``functorch``: the same with ``force_functorch=True`` (per-sample gradients from ``torch.func.vmap``).
* ``fit_plain`` / ``fit_dp``: the same step inside ``Trainer.fit`` of the ``TextClassifier`` on the tweets
  datamodule, without and with the ``OpacusDP`` callback (``noise_multiplier=1``): the callback as users run it,
  Poisson batches of mean size ``--batch-size`` included (``fit_dp`` is compared with ``fit_plain``).
* ``ghost``: Opacus' ghost clipping (Li et al., arXiv 2110.05679; Bu et al., arXiv 2205.10683):
  ``GradSampleHooksFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` + ``DPLossFastGradientClipping``
  (per-sample norms without per-sample gradients, then a second backward pass). It needs the per-sample loss, so
  a callback cannot use it without the module's help; it is measured to know what it would gain.

Run (writes ``benchmarks/results/dp_sgd_step/smollm2_lora.json``):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/dp_sgd_step.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
MODES = ("plain", "hooks", "functorch", "ghost", "fit_plain", "fit_dp")


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(model: str, batch_size: int, max_length: int) -> tuple[nn.Module, dict[str, torch.Tensor], object]:
    """The LoRA classifier, one batch of encoded tweets and the datamodule."""
    from privtune.datamodules import TweetsSentiment
    from privtune.modules import TextClassifier

    data = TweetsSentiment(
        train_size=max(batch_size * 8, 64),
        val_size=8,
        test_size=8,
        max_length=max_length,
        batch_size=batch_size,
        tokenizer=model,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = TextClassifier(model=model, tuning="lora", lr=1e-3)
    module.label_token_ids = data.label_token_ids
    module.train()
    return module, batch, data


def fit_times(module: nn.Module, data: object, dp: bool, steps: int) -> list[float]:
    """Seconds per training step of ``Trainer.fit`` (the first, warm-up step dropped), with or without OpacusDP."""
    import lightning.pytorch as pl

    from privtune.callbacks.dp_sgd import OpacusDP

    times: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            times.append(time.perf_counter() - self.start)

    callbacks = [StepTimer(), *([OpacusDP(noise_multiplier=1.0, max_grad_norm=1.0)] if dp else [])]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps + 1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return times[1:]


def make_step(mode: str, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Callable[[], None], Callable]:
    """A step function for ``mode`` and a function that detaches its hooks."""
    params = [p for p in module.parameters() if p.requires_grad]
    base = torch.optim.AdamW(params, lr=1e-3)
    x, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if mode == "plain":

        def step() -> None:
            base.zero_grad()
            F.cross_entropy(module(x, mask).float(), y).backward()
            base.step()

        return step, lambda: None
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    kwargs = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": len(y), "loss_reduction": "mean"}
    if mode in ("hooks", "functorch"):
        from opacus.grad_sample import GradSampleHooks

        hooks = GradSampleHooks(
            module, batch_first=True, loss_reduction="mean", strict=False, force_functorch=mode == "functorch"
        )
        optimizer = DPOptimizer(base, **kwargs)

        def step() -> None:
            optimizer.zero_grad()
            F.cross_entropy(module(x, mask).float(), y).backward()
            optimizer.step()

        return step, hooks.remove_hooks
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    hooks = GradSampleHooksFastGradientClipping(
        module, batch_first=True, loss_reduction="mean", strict=False, max_grad_norm=1.0, use_ghost_clipping=True
    )
    optimizer = DPOptimizerFastGradientClipping(base, **kwargs)
    criterion = DPLossFastGradientClipping(hooks, optimizer, nn.CrossEntropyLoss(), loss_reduction="mean")

    def step() -> None:
        optimizer.zero_grad()
        criterion(module(x, mask).float(), y).backward()
        optimizer.step()

    return step, hooks.remove_hooks


class _Done(Exception):  # noqa: N818 - control flow: a fit mode measured its steps itself
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode in the first round")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: on a loaded machine, 2 threads stall each other)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/dp_sgd_step/smollm2_lora.json"))
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    module, batch, data = build(args.model, args.batch_size, args.max_length)
    modes = ["plain", *[m for m in args.modes if m != "plain"]]
    times: dict[str, list[float]] = {m: [] for m in modes}
    per_round: dict[str, list[float]] = {m: [] for m in modes}
    errors: dict[str, str] = {}
    for r in range(args.rounds):
        for mode in modes:
            if mode in errors:
                continue
            try:
                if mode.startswith("fit_"):
                    t = fit_times(module, data, mode == "fit_dp", args.steps)
                    raise _Done
                step, detach = make_step(mode, module, batch)
                for _ in range(args.warmup if r == 0 else 0):
                    step()
                t = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    t.append(time.perf_counter() - start)
                detach()
            except _Done:
                pass
            except Exception as err:  # noqa: BLE001 - a mode Opacus cannot run on this model is reported, not hidden
                errors[mode] = f"{type(err).__name__}: {err}"[:500]
                continue
            finally:
                for p in module.parameters():
                    p.grad_sample = None
                    p.grad = None
            times[mode] += t
            per_round[mode].append(statistics.median(t))
            print(f"round {r} {mode:9s} median {statistics.median(t):.3f}s", flush=True)
    plain = statistics.median(times["plain"])
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "git_commit": _git_commit(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "tuning": "lora (r=8, alpha=16, peft defaults for the architecture)",
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rounds": args.rounds,
        "timed_steps_per_mode_per_round": args.steps,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "median_step_s": {m: statistics.median(t) for m, t in times.items() if t},
        "ratio_to_plain": {m: statistics.median(t) / plain for m, t in times.items() if t and not m.startswith("fit")},
        "ratio_to_plain_per_round": {
            m: [v / p for v, p in zip(rs, per_round["plain"], strict=False)]
            for m, rs in per_round.items()
            if not m.startswith("fit")
        },
        "fit_dp_over_fit_plain": (
            statistics.median(times["fit_dp"]) / statistics.median(times["fit_plain"])
            if times.get("fit_dp") and times.get("fit_plain")
            else None
        ),
        "fit_dp_over_fit_plain_per_round": [
            d / p for d, p in zip(per_round.get("fit_dp", []), per_round.get("fit_plain", []), strict=False)
        ],
        "errors": errors,
        "notes": args.notes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    keys = ("median_step_s", "ratio_to_plain", "fit_dp_over_fit_plain", "errors")
    print(json.dumps({k: result[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
