"""Tiny federated runs shared by the strategy tests and the DDP subprocess scripts."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from privtune.datamodules import TextFile
from privtune.datamodules.federated import FederatedDataModule
from privtune.modules.prompt_tuning import PromptTuning
from privtune.strategies import FederatedConfig, FederatedDDP, FederatedSimulation

WORDS = [
    *("good", "bad", "great", "awful", "happy", "sad", "love", "hate", "fine"),
    *("okay", "market", "film", "game", "vote", "phone", "team", "music", "news"),
]


def write_csv(path: Path, n: int = 48, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = ["negative", "positive"][i % 2]
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (5,), generator=g)]
        words.append("good" if label == "positive" else "bad")
        rows.append({"text": " ".join(words), "label": label})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_data(csv_path: Path, num_clients: int = 6, **kw: Any) -> FederatedDataModule:
    inner = TextFile(
        str(csv_path),
        template="Tweet: {text}\nSentiment:",
        label_words=[" negative", " positive"],
        train_size=kw.pop("train_size", 24),
        val_size=4,
        test_size=12,
        max_length=24,
        batch_size=4,
        seed=0,
    )
    return FederatedDataModule(inner, num_clients=num_clients, alpha=kw.pop("alpha", 0.5), seed=1, **kw)


def make_trainer(
    strategy: pl.strategies.Strategy, tmp: Path, devices: int = 1, callbacks: list[pl.Callback] | None = None
) -> pl.Trainer:
    return pl.Trainer(
        callbacks=callbacks,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=1,
        default_root_dir=str(tmp),
    )


def run(
    tmp: Path,
    model: str = "tiny-llama",
    ddp: bool = False,
    devices: int = 1,
    strategy_cls: Any = None,
    encoder_head: str = "label_names",
    callbacks: list[pl.Callback] | None = None,
    **fed: Any,
) -> tuple[pl.Trainer, Any]:
    csv_path = write_csv(tmp / "data.csv")
    num_clients = fed.pop("num_clients", 6)
    config = FederatedConfig(**{"num_rounds": 3, "sample_fraction": 0.5, "local_max_steps": 2, **fed})
    cls = strategy_cls or (FederatedDDP if ddp else FederatedSimulation)
    strategy = cls(federated=config, process_group_backend="gloo") if ddp else cls(federated=config)
    kwargs = {"num_labels": 2, "encoder_head": encoder_head} if model == "tiny-bert" else {}
    module = PromptTuning(model=model, num_virtual_tokens=2, seed=0, **kwargs)
    data = make_data(csv_path, num_clients=num_clients)
    trainer = make_trainer(strategy, tmp, devices, callbacks)
    trainer.fit(module, datamodule=data)
    return trainer, strategy
