"""Split any classification datamodule across simulated federated clients.

:class:`FederatedDataModule` wraps a :class:`~privtune.datamodules.TextClassificationDataModule` (tweets, BBC News,
a user's file), partitions its train split with :func:`privtune.federated.partition_labels` (IID, Dirichlet label
skew as in FedPepTAO, arXiv 2310.15080, or Dirichlet size skew) and its evaluation split the same way (same class
priors and size proportions, for personalised evaluation). Partitions derive from the seed only and are saved as
JSON with the run.

The Lightning ``train_dataloader`` yields one item per federated round (the Strategy runs the clients). The module
implements the round loop's :class:`privtune.federated.ClientData` Protocol: ``num_clients``,
:meth:`client_train_loader`, :meth:`client_eval_loader` and :meth:`client_num_examples`.

Threat model: simulation only; each client's loader reads only its own shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from privtune.datamodules.classification import TextClassificationDataModule
from privtune.federated.partition import Partition, partition_labels, partition_like, validate_partition_args


class _RoundTicker(Dataset):
    """``num_rounds`` items; the Strategy runs one federated round per item."""

    def __init__(self, num_rounds: int) -> None:
        self.num_rounds = num_rounds

    def __len__(self) -> int:
        return self.num_rounds

    def __getitem__(self, idx: int) -> int:
        return idx


class FederatedDataModule(pl.LightningDataModule):
    """Client-partitioned view of a classification datamodule.

    Args:
        datamodule: the wrapped datamodule (its splits, template, tokenizer and batch size are used as they are).
        num_clients: ``N``.
        partition: ``iid``, ``dirichlet_label`` or ``dirichlet_quantity``.
        alpha: Dirichlet label concentration (lower = more label skew).
        size_alpha: Dirichlet size concentration (lower = more unequal client sizes).
        seed: seed of the partition.
        eval_split: the split used for personalised evaluation (``test`` as in the FedPepTAO code, or ``val``).
        partition_dir: folder where ``partition_train.json`` / ``partition_eval.json`` are written (skipped if None).

    Raises:
        ValueError: for an unknown partition mode, ``num_clients < 1``, ``alpha <= 0``, ``size_alpha <= 0``, or
            more clients than training examples (checked here when the train size is a count, else in ``setup``
            before any training).
    """

    def __init__(
        self,
        datamodule: TextClassificationDataModule,
        num_clients: int = 20,
        partition: Literal["iid", "dirichlet_label", "dirichlet_quantity"] = "dirichlet_label",
        alpha: float = 0.5,
        size_alpha: float = 5.0,
        seed: int = 42,
        eval_split: Literal["test", "val"] = "test",
        partition_dir: str | None = None,
    ) -> None:
        super().__init__()
        train_size = datamodule.sizes[0]
        known = train_size if isinstance(train_size, int) else max(num_clients, 1)
        validate_partition_args(known, num_clients, partition, alpha, size_alpha)
        if eval_split not in ("test", "val"):
            raise ValueError(f"`eval_split` must be one of ('test', 'val'); got {eval_split!r}.")
        self.inner = datamodule
        self.num_clients, self.partition_mode = num_clients, partition
        self.alpha, self.size_alpha, self.seed = alpha, size_alpha, seed
        self.eval_split, self.partition_dir = eval_split, partition_dir
        self.train_partition: Partition | None = None
        self.eval_partition: Partition | None = None
        self.num_rounds = 1  # set by the federated Strategy

    # ------------------------------------------------------------------ proxies of the wrapped datamodule
    @property
    def label_token_ids(self) -> torch.Tensor | None:
        """The verbalizer's token ids (decoders)."""
        return self.inner.label_token_ids

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.inner.num_classes

    @property
    def label_names(self) -> list[str]:
        """Class names."""
        return self.inner.label_names

    # ------------------------------------------------------------------ partition
    @override
    def setup(self, stage: str | None = None) -> None:
        self.inner.trainer = self.trainer
        self.inner.setup(stage)
        if self.train_partition is not None:
            return
        train_labels = self.inner.splits["train"].labels
        eval_labels = self.inner.splits[self.eval_split].labels
        validate_partition_args(len(train_labels), self.num_clients, self.partition_mode, self.alpha, self.size_alpha)
        self.train_partition = partition_labels(
            train_labels, self.num_clients, self.partition_mode, self.alpha, self.size_alpha, self.seed
        )
        self.eval_partition = partition_like(eval_labels, self.train_partition)
        if self.partition_dir is not None:
            out = Path(self.partition_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.train_partition.save(out / "partition_train.json", train_labels, self.num_classes)
            self.eval_partition.save(out / "partition_eval.json", eval_labels, self.num_classes)

    def _require(self) -> tuple[Partition, Partition]:
        if self.train_partition is None or self.eval_partition is None:
            raise RuntimeError("call `setup()` before asking for client data.")
        return self.train_partition, self.eval_partition

    def client_num_examples(self, client_id: int) -> int:
        """``n_k``: the client's number of training examples."""
        return len(self._require()[0].indices[client_id])

    def client_train_loader(self, client_id: int, seed: int) -> DataLoader:
        """The client's training batches, shuffled by ``seed`` (the same on every rank and after a resume)."""
        train, _ = self._require()
        dataset = Subset(self.inner._encoded["train"], train.indices[client_id])
        return DataLoader(
            dataset,
            batch_size=self.inner.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=self.inner._collate,
        )

    def client_eval_loader(self, client_id: int) -> DataLoader:
        """The client's evaluation shard, in order."""
        _, evaluation = self._require()
        dataset = Subset(self.inner._encoded[self.eval_split], evaluation.indices[client_id])
        return DataLoader(dataset, batch_size=self.inner.eval_batch_size, collate_fn=self.inner._collate)

    # ------------------------------------------------------------------ Lightning loaders
    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_RoundTicker(self.num_rounds), batch_size=1)
