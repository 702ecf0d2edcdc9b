"""Overhead of privtune's tuning step against a plain PyTorch loop on the same batches, in one process.

Both sides run the same model (SmolLM2-135M-Instruct with LoRA by default), the same label-word scoring
forward, cross-entropy, backward and AdamW step, on the same pre-collated tweet batches:

* ``plain``: a hand-written ``for batch in batches`` loop;
* ``privtune``: :class:`privtune.modules.TextClassifier` driven by ``lightning.Trainer.fit``.

The two are interleaved over several rounds (the sides alternate which runs first) so that drift in the
machine's speed hits both alike, and the median step time of each is compared. Reported: steps/s,
tokens/s (non-padding tokens), peak RSS growth during each phase (median over rounds), the ratio
privtune / plain, and the achieved FLOP/s of the step (counted with ``torch.utils.flop_counter``)
against a measured fp32 matmul peak of this machine.

Run: ``python benchmarks/baseline_overhead.py`` (``--model tiny-llama`` for a seconds-long smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from privtune.datamodules import TweetsSentiment
from privtune.models.scoring import label_word_logits
from privtune.modules import TextClassifier

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident set size every 20 ms; ``peak - start`` is the phase's growth."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best achieved fp32 FLOP/s of an ``n x n`` matmul on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_module(args: argparse.Namespace) -> TextClassifier:
    pl.seed_everything(0)
    return TextClassifier(args.model, tuning=args.tuning, lr=1e-4)


def plain_loop(module: TextClassifier, batches: list[dict], label_ids: torch.Tensor) -> list[float]:
    """The baseline: the same forward / loss / backward / AdamW step, no framework."""
    model = module.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for batch in batches:
        t = time.perf_counter()
        logits = label_word_logits(model, batch["input_ids"], batch["attention_mask"], label_ids)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return times


class StepTimer(pl.Callback):
    """Wall time of each training step as the Trainer sees it (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter() - self._t)


def privtune_fit(module: TextClassifier, batches: list[dict], datamodule: TweetsSentiment) -> list[float]:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    module.label_token_ids = datamodule.label_token_ids
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tuning", default="lora", choices=["lora", "full", "prompt"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved (plain, privtune) rounds")
    parser.add_argument("--out", default="benchmarks/results/baseline_overhead.json")
    args = parser.parse_args()

    data = TweetsSentiment(
        train_size=args.batch_size * (args.steps + args.warmup),
        val_size=8,
        test_size=8,
        batch_size=args.batch_size,
        max_length=args.max_length,
        tokenizer=args.model,
    )
    data.setup("fit")
    batches = list(data.train_dataloader())[: args.steps + args.warmup]
    tokens = [int(b["attention_mask"].sum()) for b in batches[args.warmup :]]

    results: dict[str, dict[str, list[float]]] = {"plain": {"t": [], "rss": []}, "privtune": {"t": [], "rss": []}}
    for round_idx in range(args.rounds):
        # Alternate which side goes first: the first phase of a process also pays the allocator's growth,
        # so with an even number of rounds each side pays it equally often in the peak-RSS figures.
        order = ("plain", "privtune") if round_idx % 2 == 0 else ("privtune", "plain")
        for side in order:
            module = make_module(args)
            with PeakRSS() as rss:
                if side == "plain":
                    times = plain_loop(module, batches, data.label_token_ids)
                else:
                    times = privtune_fit(module, batches, data)
            results[side]["t"].extend(times[args.warmup :])
            results[side]["rss"].append(rss.peak - rss.start)
            del module

    # FLOPs of one training step (forward + backward), counted on the plain path.
    module = make_module(args)
    with FlopCounterMode(display=False) as counter:
        logits = label_word_logits(
            module.model, batches[0]["input_ids"], batches[0]["attention_mask"], data.label_token_ids
        )
        F.cross_entropy(logits, batches[0]["labels"]).backward()
    step_flops = counter.get_total_flops()
    peak = matmul_peak_flops()

    summary = {
        "model": args.model,
        "tuning": args.tuning,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
    }
    for side, r in results.items():
        step = statistics.median(r["t"])
        summary[side] = {
            "median_step_s": round(step, 4),
            "steps_per_s": round(1 / step, 3),
            "tokens_per_s": round(statistics.mean(tokens) / step, 1),
            "peak_rss_growth_mb": round(statistics.median(r["rss"]) / 2**20, 1),
            "achieved_gflops": round(step_flops / step / 1e9, 2),
        }
    summary["step_time_ratio_privtune_over_plain"] = round(
        summary["privtune"]["median_step_s"] / summary["plain"]["median_step_s"], 4
    )
    summary["step_gflop"] = round(step_flops / 1e9, 2)
    summary["matmul_peak_gflops"] = round(peak / 1e9, 1)
    summary["plain_fraction_of_peak"] = round(summary["plain"]["achieved_gflops"] * 1e9 / peak, 3)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(
        f"\nprivtune / plain step time: {summary['step_time_ratio_privtune_over_plain']:.3f} "
        f"(target <= 1.05); plain loop reaches {100 * summary['plain_fraction_of_peak']:.1f}% of the "
        f"{summary['matmul_peak_gflops']} GFLOP/s matmul peak."
    )


if __name__ == "__main__":
    main()
