"""Step overhead of the EmbeddingShaking callback against the same run without it.

The callback's per-step work is one gather ``pi[input_ids]`` on the batch (the model is shaken once at setup),
so its overhead should vanish next to a forward/backward pass. Runs with and without the callback alternate
(``--repeats`` each, in one process) and the median time per training step (from ``on_train_batch_start``
of the first callback to ``on_train_batch_end``, the mapping included) is compared.

Run:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/shaking_overhead.py --model tiny-llama
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/shaking_overhead.py --model smollm2-135m-instruct \
        --steps 12 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl

from privtune.callbacks.embedding_shaking import EmbeddingShaking
from privtune.datamodules import TweetsSentiment
from privtune.modules import TextClassifier


class StepTimer(pl.Callback):
    """Wall-clock seconds of every training step (put it first in the callback list)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001, D102
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001, D102
        self.times.append(time.perf_counter() - self._start)


def run(model: str, steps: int, shaking: bool, key_dir: str, max_length: int, batch_size: int) -> list[float]:
    pl.seed_everything(0)
    module = TextClassifier(model=model, tuning="lora", lr=1e-3)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if shaking:
        callbacks.append(EmbeddingShaking(f"{key_dir}/key.json", operators=["gaussian"], chain_length=1))
    data = TweetsSentiment(train_size=steps * batch_size, val_size=8, test_size=8, max_length=max_length,
                           batch_size=batch_size)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return timer.times[2:]  # the first steps warm up allocators and kernels


def mapping_cost(batch_size: int, length: int, calls: int = 2000) -> float:
    """Microseconds of the callback's per-step work (``shake_batch``) on one batch, measured directly."""
    import torch

    from privtune.models import load_model
    from privtune.shaking import KeySetting, ShakeKey, shake_model

    model = load_model("tiny-llama")
    key = ShakeKey.generate(KeySetting(chain_length=0), model.get_input_embeddings().weight, seed=1)
    shake_model(model, key)
    cb = EmbeddingShaking("unused.json")
    cb.key, cb._model = key, model
    batch = {"input_ids": torch.randint(0, 512, (batch_size, length)), "labels": torch.zeros(batch_size)}
    start = time.perf_counter()
    for _ in range(calls):
        cb.shake_batch(dict(batch))
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="optional JSON output path")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    plain, shaken, ratios = [], [], []
    with tempfile.TemporaryDirectory() as key_dir:
        for i in range(args.repeats):
            # alternate the order inside each pair so that warm-up and load drifts do not favour one side
            order = (False, True) if i % 2 == 0 else (True, False)
            times = {s: run(args.model, args.steps, s, key_dir, args.max_length, args.batch_size) for s in order}
            plain += times[False]
            shaken += times[True]
            ratios.append(statistics.median(times[True]) / statistics.median(times[False]))
    result = {
        "model": args.model,
        "steps_measured": [len(plain), len(shaken)],
        "median_step_s": {"without": statistics.median(plain), "with": statistics.median(shaken)},
        "overhead_pct": 100 * (statistics.median(shaken) / statistics.median(plain) - 1),
        "overhead_pct_per_pair": [100 * (r - 1) for r in ratios],
        "mapping_us_per_step": mapping_cost(args.batch_size, args.max_length),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
