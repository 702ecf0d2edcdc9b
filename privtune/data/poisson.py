"""Poisson sampling for DP-SGD: each example joins a batch independently with probability ``q``.

The privacy amplification that DP-SGD accountants use (the Sampled Gaussian Mechanism, Mironov et al.,
arXiv 1908.10530; Abadi et al., arXiv 1607.00133) assumes that every step draws its batch by including each of
the ``N`` examples independently with probability ``q = B / N``; batches then have a variable size with mean
``B``. Shuffled fixed-size batches are a different mechanism that the same ``epsilon`` does not cover. This is
the batch sampler of Opacus' ``DPDataLoader`` (arXiv 2109.12298), made resumable: the draw of batch ``i`` of
epoch ``e`` depends only on ``(seed, e, i)``, so a run killed mid-epoch and resumed draws exactly the batches an
uninterrupted run would have drawn.

An empty draw (probability ``(1 - q)^N``) still has to be a step: skipping it would change the mechanism. The
sampler yields a *placeholder* batch (example 0) for it and :meth:`PoissonBatchSampler.is_placeholder` tells the
training loop to discard that example's per-sample gradient, so the step adds only noise, as Opacus does with an
empty batch.

Threat model: the randomness is a seeded ``torch.Generator`` (Opacus' default, not its ``secure_mode``); it
hides which examples were used from whoever sees the model, not from whoever knows the seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["PoissonBatchSampler"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch, batch) over the 64-bit seed space


def _draw_seed(seed: int, epoch: int, index: int) -> int:
    h = (seed * _MIX + epoch) & 0xFFFFFFFFFFFFFFFF
    h = (h * _MIX + index) & 0xFFFFFFFFFFFFFFFF
    return h ^ (h >> 31)


class PoissonBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Seeded Poisson batches, ``batches_per_epoch`` of them per epoch, with a settable start position.

    Args:
        num_examples: dataset length ``N``.
        sample_rate: inclusion probability ``q`` in (0, 1]; the expected batch size is ``q N``.
        seed: base seed; batch ``i`` of epoch ``e`` is drawn from ``(seed, e, i)``.
        batches_per_epoch: steps that make an "epoch" (default ``ceil(1 / q)``, so an epoch sees about ``N``
            examples, like the shuffled loader it replaces).

    Raises:
        ValueError: for ``num_examples < 1``, ``sample_rate`` outside (0, 1] or ``batches_per_epoch < 1``.
    """

    def __init__(
        self, num_examples: int, sample_rate: float, seed: int = 0, batches_per_epoch: int | None = None
    ) -> None:
        if num_examples < 1:
            raise ValueError(f"`num_examples={num_examples}` must be >= 1 for Poisson sampling.")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"`sample_rate={sample_rate}` must be in (0, 1].")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"`batches_per_epoch={batches_per_epoch}` must be >= 1.")
        self.num_examples = num_examples
        self.sample_rate = sample_rate
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch or math.ceil(1 / sample_rate)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches) to skip when that epoch is iterated

    @property
    def expected_batch_size(self) -> float:
        """``q N``, the mean batch size (the divisor DP-SGD uses for a mean loss)."""
        return self.sample_rate * self.num_examples

    def draw(self, epoch: int, index: int) -> list[int]:
        """The indices Poisson-sampled for batch ``index`` of ``epoch`` (possibly empty)."""
        gen = torch.Generator().manual_seed(_draw_seed(self.seed, epoch, index))
        mask = torch.rand(self.num_examples, generator=gen) < self.sample_rate
        return mask.nonzero().flatten().tolist()

    def is_placeholder(self, epoch: int, index: int) -> bool:
        """Whether batch ``index`` of ``epoch`` was an empty draw, served as a placeholder example."""
        return not self.draw(epoch, index)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (Lightning and DDP-style loops call this)."""
        self.epoch = epoch

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Start the next iteration in ``epoch`` after its first ``batches_done`` batches (mid-epoch resume)."""
        if batches_done >= self.batches_per_epoch:  # the epoch was finished: continue with the next one
            epoch, batches_done = epoch + 1, 0
        self.epoch = epoch
        self._skip = (epoch, batches_done) if batches_done else None

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        start = self._skip[1] if self._skip is not None and self._skip[0] == epoch else 0
        self._skip = None
        self.epoch = epoch + 1  # eagerly, when the iterator is made: the following iteration is the next epoch
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[list[int]]:
        for index in range(start, self.batches_per_epoch):
            yield self.draw(epoch, index) or [0]

    def __len__(self) -> int:
        # The full epoch, also while skipping: the training loop counts the skipped batches as done itself.
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, float | int]:
        """The sampler's identity; the position itself comes from the training loop's progress."""
        return {
            "seed": self.seed,
            "num_examples": self.num_examples,
            "sample_rate": self.sample_rate,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Refuse to resume over other data, another seed or another batch size (``q``).

        Raises:
            ValueError: naming the checkpoint's values and this run's.
        """
        saved = {k: state.get(k, v) for k, v in self.state_dict().items()}
        if saved != self.state_dict():
            old_b = float(saved["sample_rate"]) * int(saved["num_examples"])
            raise ValueError(
                f"The checkpoint drew Poisson batches with `seed={saved['seed']}`, expected batch size {old_b:g} "
                f"(q={float(saved['sample_rate']):.6g}) over {saved['num_examples']} examples and "
                f"{saved['batches_per_epoch']} batches per epoch, but this run has `seed={self.seed}`, batch size "
                f"{self.expected_batch_size:g} (q={self.sample_rate:.6g}) over {self.num_examples} examples and "
                f"{self.batches_per_epoch} batches per epoch: resume with the checkpoint's `batch_size` and data, "
                "or start a new run."
            )
