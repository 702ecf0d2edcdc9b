"""Training loaders that resume in the middle of an epoch, shared by every privtune datamodule.

Lightning restores its loop progress from a checkpoint but not the position inside a plain DataLoader;
these loaders shuffle with a :class:`~privtune.data.sampler.ResumableSampler` and start where the restored
loop expects the next batch, so a run killed mid-epoch and resumed sees the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from privtune.data.sampler import ResumableSampler

__all__ = ["ResumableDataLoader", "ResumableSampler", "resumable_train_loader", "resume_position"]


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that Lightning saves in and restores from checkpoints."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def resume_position(sampler: ResumableSampler, trainer: pl.Trainer | None, batch_size: int) -> None:
    """Point ``sampler`` at the batch a restored fit loop will ask for next (mid-epoch resume).

    On a fresh run the loop's progress is zero and the sampler starts epoch 0 at its first example. A
    checkpoint written in ``on_train_batch_end`` counts the batch in ``processed`` but not yet in
    ``completed``, so ``processed`` is the number of batches already trained on in the epoch.
    """
    if trainer is None:
        return
    loop = trainer.fit_loop
    epoch = loop.epoch_progress.current.completed
    skip = loop.epoch_loop.batch_progress.current.processed * batch_size
    if skip >= sampler.num_examples:  # saved after the epoch's last batch: resume at the next epoch
        epoch, skip = epoch + 1, 0
    sampler.set_position(epoch, skip)


def resumable_train_loader(
    dataset: Dataset, batch_size: int, seed: int, trainer: pl.Trainer | None, **kwargs: Any
) -> ResumableDataLoader:
    """A shuffling training loader positioned where a (possibly restored) fit loop continues."""
    sampler = ResumableSampler(len(dataset), seed)
    resume_position(sampler, trainer, batch_size)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
