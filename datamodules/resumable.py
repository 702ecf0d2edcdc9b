"""Training loaders that resume in the middle of an epoch, shared by every privtune datamodule.

Lightning restores its loop progress from a checkpoint but not the position inside a plain DataLoader;
these loaders shuffle with a :class:`~privtune.data.sampler.ResumableSampler` (or draw Poisson batches with a
:class:`~privtune.data.poisson.PoissonBatchSampler`, for DP-SGD) and start where the restored loop expects the
next batch, so a run killed mid-epoch and resumed sees the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset

from privtune.contracts import IndexableDataset
from privtune.data.poisson import PoissonBatchSampler
from privtune.data.sampler import ResumableSampler

__all__ = [
    "PoissonDataLoader",
    "ResumableDataLoader",
    "ResumableSampler",
    "loader_batch_size",
    "poisson_train_loader",
    "resumable_train_loader",
    "resume_position",
]

_WRAP_HINT = (
    "build the training loader as `DataLoader(dataset, batch_size=B, shuffle=True, collate_fn=...)` over a "
    "map-style dataset (with `__len__` and `__getitem__`), or wrap it yourself: `DataLoader(dataset, "
    "batch_sampler=privtune.data.poisson.PoissonBatchSampler(len(dataset), sample_rate=B / len(dataset)), "
    "collate_fn=...)`"
)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that Lightning saves in and restores from checkpoints."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class PoissonDataLoader(DataLoader):
    """A DataLoader over a :class:`PoissonBatchSampler` that Lightning saves in and restores from checkpoints."""

    batch_sampler: PoissonBatchSampler

    def state_dict(self) -> dict[str, float | int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.batch_sampler.load_state_dict(state)


def _progress(trainer: pl.Trainer) -> tuple[int, int]:
    """``(epochs completed, batches processed in the current epoch)`` of a (possibly restored) fit loop.

    A checkpoint written in ``on_train_batch_end`` counts the batch in ``processed`` but not yet in
    ``completed``, so ``processed`` is the number of batches already trained on in the epoch.
    """
    loop = trainer.fit_loop
    return loop.epoch_progress.current.completed, loop.epoch_loop.batch_progress.current.processed


def resume_position(sampler: ResumableSampler, trainer: pl.Trainer | None, batch_size: int) -> None:
    """Point ``sampler`` at the batch a restored fit loop will ask for next (mid-epoch resume).

    On a fresh run the loop's progress is zero and the sampler starts epoch 0 at its first example. The
    position is kept in batches with ``batch_size`` recorded, so that the checkpoint's batch size can be checked
    when the loader's state is restored.
    """
    if trainer is None:
        sampler.batch_size = batch_size
        return
    sampler.resume_at(*_progress(trainer), batch_size=batch_size)


def resumable_train_loader(
    dataset: Dataset, batch_size: int, seed: int, trainer: pl.Trainer | None, **kwargs: Any
) -> ResumableDataLoader:
    """A shuffling training loader positioned where a (possibly restored) fit loop continues."""
    sampler = ResumableSampler(len(dataset), seed, batch_size=batch_size)
    resume_position(sampler, trainer, batch_size)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)


def loader_batch_size(loader: DataLoader) -> int:
    """The fixed batch size of ``loader``.

    Raises:
        ValueError: for an iterable-style dataset or a custom batch sampler, saying how to build the loader.
    """
    if isinstance(loader.dataset, IterableDataset) or not isinstance(loader.dataset, IndexableDataset):
        raise ValueError(
            f"OpacusDP needs to sample examples by index (`privtune.contracts.IndexableDataset`, docs/dp_sgd.md), "
            f"but the training loader reads a {type(loader.dataset).__name__} without `__len__`/`__getitem__`: "
            f"{_WRAP_HINT}."
        )
    if isinstance(loader.batch_sampler, PoissonBatchSampler):
        return round(loader.batch_sampler.expected_batch_size)
    if loader.batch_size is not None:
        return loader.batch_size
    if isinstance(loader.batch_sampler, BatchSampler):
        return loader.batch_sampler.batch_size
    raise ValueError(
        f"OpacusDP cannot tell the batch size of the training loader: it uses a custom "
        f"`batch_sampler={type(loader.batch_sampler).__name__}`; {_WRAP_HINT}."
    )


def poisson_train_loader(loader: DataLoader, seed: int, trainer: pl.Trainer | None) -> PoissonDataLoader:
    """``loader`` with its batch sampler replaced by seeded Poisson sampling at ``q = B / N`` (as Opacus does).

    The dataset, collate function and worker settings are kept; an epoch has as many batches as ``loader`` had,
    and the sampler starts where a (possibly restored) fit loop continues.

    Raises:
        ValueError: if ``loader`` cannot be sampled by index or its batch size is unknown (the message says how
            to build or wrap it), or if the batch size exceeds the dataset.
    """
    if isinstance(loader, PoissonDataLoader):
        sampler = loader.batch_sampler
    else:
        batch_size = loader_batch_size(loader)
        n = len(loader.dataset)
        if batch_size > n:
            raise ValueError(
                f"The training batch size {batch_size} exceeds the {n} training examples: Poisson sampling "
                f"needs `batch_size` <= {n}."
            )
        sampler = PoissonBatchSampler(n, batch_size / n, seed=seed, batches_per_epoch=max(1, len(loader)))
    if trainer is not None:
        sampler.set_position(*_progress(trainer))
    if isinstance(loader, PoissonDataLoader):
        return loader
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
    return PoissonDataLoader(
        loader.dataset,
        batch_sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        **extra,
    )
