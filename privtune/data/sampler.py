"""A shuffling sampler that can resume in the middle of an epoch.

Each epoch's order is a permutation drawn from ``seed + epoch``, so the order never depends on how many
times the process was restarted. :meth:`ResumableSampler.set_position` makes the next iteration start
``skip`` examples into epoch ``epoch``: a run killed mid-epoch and resumed sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded per-epoch shuffling with a settable start position.

    Args:
        num_examples: dataset length.
        seed: base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(self, num_examples: int, seed: int = 0) -> None:
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        """Start the next iteration in ``epoch``, after its first ``skip`` examples."""
        self.epoch = epoch
        self._skip = skip

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_examples, generator=gen).tolist()
        skip, self._skip = self._skip, 0
        self.epoch += 1  # the following iteration is the next epoch
        yield from order[skip:]

    def state_dict(self) -> dict[str, int]:
        """The sampler's identity; the position itself is set from the training loop's progress."""
        return {"seed": self.seed, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Refuse to resume a run over different data or a different shuffle seed.

        Raises:
            ValueError: if the checkpoint was written with another seed or dataset size.
        """
        saved = (state.get("seed", self.seed), state.get("num_examples", self.num_examples))
        if saved != (self.seed, self.num_examples):
            raise ValueError(
                f"The checkpoint was trained with `seed={saved[0]}` over {saved[1]} examples, but this run has "
                f"`seed={self.seed}` over {self.num_examples}: resuming would not reproduce the run."
            )

    def __len__(self) -> int:
        # The full epoch length, also while skipping: the training loop counts the skipped batches as done
        # (it restores its own progress), and a shorter length would shorten every later epoch too.
        return self.num_examples
