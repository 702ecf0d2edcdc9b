"""How many noisy steps a DP-SGD run takes, from every limit that really ends it.

The noise of DP-SGD (Abadi et al., arXiv 1607.00133) is chosen so that ``epsilon`` reaches the target after a
known number of steps ``T``. Planning for more steps than run adds noise for nothing; planning for fewer spends
more than asked unless the run is cut at the budget. :func:`plan_steps` takes the smallest finite bound among an
explicit ``steps``, ``max_steps`` and ``max_epochs x batches per epoch`` (the latter after
``limit_train_batches``), counting the steps a resumed run already took, and refuses a run with no finite bound
(one limited only by wall-clock time, or not at all): its step count is unknown before it runs.

Threat model: as for DP-SGD; a plan only sets the noise, the hard cap on the spent budget is enforced step by step
by the caller (``privtune.callbacks.OpacusDP``).
"""

from __future__ import annotations

import math

__all__ = ["UnboundedRunError", "plan_steps"]


class UnboundedRunError(ValueError):
    """The run has no finite bound on its number of steps and no explicit ``steps``."""


def _finite(value: int | float | None) -> bool:
    return value is not None and value >= 0 and math.isfinite(value)


def plan_steps(
    batches_per_epoch: int | float,
    *,
    max_epochs: int | None,
    max_steps: int | None,
    steps: int | None = None,
    accumulate_grad_batches: int = 1,
) -> int:
    """Total optimizer steps of the run (including those a resumed run already took).

    Args:
        batches_per_epoch: training batches per epoch after ``limit_train_batches`` (``inf`` if unsized).
        max_epochs: the trainer's epoch limit; ``None`` or ``-1`` is no limit.
        max_steps: the trainer's optimizer-step limit; ``None`` or ``-1`` is no limit.
        steps: an explicit plan (e.g. for a run bounded by ``max_time``); ``None`` is none.
        accumulate_grad_batches: batches per optimizer step (the last group of an epoch counts as a step).

    Returns:
        The smallest finite bound, at least 1.

    Raises:
        UnboundedRunError: if no bound is finite, naming the trainer options and ``steps``.
        ValueError: for ``steps < 1`` or ``accumulate_grad_batches < 1``.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"`steps={steps}` must be >= 1.")
    if accumulate_grad_batches < 1:
        raise ValueError(f"`accumulate_grad_batches={accumulate_grad_batches}` must be >= 1.")
    bounds = []
    if steps is not None:
        bounds.append(steps)
    if _finite(max_steps):
        bounds.append(int(max_steps))
    if _finite(max_epochs) and _finite(batches_per_epoch):
        per_epoch = math.ceil(int(batches_per_epoch) / accumulate_grad_batches)
        bounds.append(int(max_epochs) * per_epoch)
    if not bounds:
        raise UnboundedRunError(
            f"The run has no finite number of steps (`max_epochs={max_epochs}`, `max_steps={max_steps}`, "
            "perhaps only `max_time`), so no noise level can be planned for the privacy budget: set "
            "`trainer.max_steps` or `trainer.max_epochs`, or give OpacusDP `steps=` (the run then stops when the "
            "budget is spent)."
        )
    return max(1, min(bounds))
