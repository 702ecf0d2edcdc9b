"""A shuffling sampler that can resume in the middle of an epoch.

Each epoch's order is a permutation drawn from ``seed + epoch``, so the order never depends on how many
times the process was restarted. :meth:`ResumableSampler.set_position` makes the next iteration start
``skip`` examples into epoch ``epoch``: a run killed mid-epoch and resumed sees exactly the batches an
uninterrupted run would have seen. The training loop counts its progress in *batches*; the sampler records the
batch size it was used with, so a resume with another batch size (the same batch count would be another number
of examples) is refused mid-epoch instead of silently skipping or repeating examples.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded per-epoch shuffling with a settable start position.

    Args:
        num_examples: dataset length.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        batch_size: the loader's batch size (recorded in checkpoints to check a resume); ``None`` if unknown.
    """

    def __init__(self, num_examples: int, seed: int = 0, batch_size: int | None = None) -> None:
        self.num_examples = num_examples
        self.seed = seed
        self.batch_size = batch_size
        self.epoch = 0
        self._skip = 0
        self._resume_point: tuple[int, int] | None = None  # (epoch, batches done) from the training loop

    def set_position(self, epoch: int, skip: int) -> None:
        """Start the next iteration in ``epoch``, after its first ``skip`` examples."""
        self.epoch = epoch
        self._skip = skip

    def resume_at(self, epoch: int, batches_done: int, batch_size: int) -> None:
        """Position after ``batches_done`` batches of ``batch_size`` in ``epoch`` (the restored loop's progress)."""
        self.batch_size = batch_size
        self._resume_point = (epoch, batches_done)
        self._position_from(batch_size)

    def _position_from(self, batch_size: int) -> None:
        epoch, batches_done = self._resume_point or (0, 0)
        skip = batches_done * batch_size
        if skip >= self.num_examples:  # saved after the epoch's last batch: resume at the next epoch
            epoch, skip = epoch + 1, 0
        self.set_position(epoch, skip)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_examples, generator=gen).tolist()
        skip, self._skip = self._skip, 0
        self.epoch += 1  # the following iteration is the next epoch
        yield from order[skip:]

    def state_dict(self) -> dict[str, int]:
        """The sampler's identity; the position itself is set from the training loop's progress."""
        state = {"seed": self.seed, "num_examples": self.num_examples}
        if self.batch_size is not None:
            state["batch_size"] = self.batch_size
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Refuse to resume a run over different data, a different shuffle seed or, mid-epoch, another batch size.

        A resume with another batch size at an epoch boundary is allowed: the position is recomputed with the
        checkpoint's batch size (a finished epoch continues with the next one).

        Raises:
            ValueError: if the checkpoint was written with another seed or dataset size, or mid-epoch with
                another batch size.
        """
        saved = (state.get("seed", self.seed), state.get("num_examples", self.num_examples))
        if saved != (self.seed, self.num_examples):
            raise ValueError(
                f"The checkpoint was trained with `seed={saved[0]}` over {saved[1]} examples, but this run has "
                f"`seed={self.seed}` over {self.num_examples}: resuming would not reproduce the run."
            )
        old = state.get("batch_size")
        if old is None or self.batch_size is None or old == self.batch_size or self._resume_point is None:
            return
        epoch, batches_done = self._resume_point
        if 0 < batches_done * old < self.num_examples:
            raise ValueError(
                f"The checkpoint stopped {batches_done} batches into epoch {epoch} with `batch_size={old}` "
                f"({batches_done * old} of {self.num_examples} examples), but this run has "
                f"`batch_size={self.batch_size}`: the same batch count would skip or repeat examples of that epoch. "
                f"Resume with `batch_size={old}`, or change the batch size only from a checkpoint saved at the end "
                "of an epoch."
            )
        self._position_from(old)

    def __len__(self) -> int:
        # The full epoch length, also while skipping: the training loop counts the skipped batches as done
        # (it restores its own progress), and a shorter length would shorten every later epoch too.
        return self.num_examples
