"""Offsite-Tuning's uniform layer drop (arXiv 2302.04870, mit-han-lab/offsite-tuning).

Of the ``n`` middle blocks the emulator keeps ``k``, evenly spaced: with ``stride = (n - 1) / (k - 1)``
it keeps middle block ``round(i * stride)`` for ``i = 0..k-1``, so the first and the last middle blocks
are always kept. ``round`` is Python's round-half-to-even, as in the official code. Threat model: the
data owner gets ``k`` of the ``n`` middle blocks (then distilled or compressed), which is too weak a model
to replace the owner's, yet close enough for the adapters to learn through.
"""

from __future__ import annotations

from privtune.emulator.layer_stack import SandwichSplit


def uniform_keep_indices(num_middle: int, num_keep: int) -> list[int]:
    """Positions ``0..num_middle-1`` of the middle blocks that the emulator keeps.

    Args:
        num_middle: ``n``, the number of middle blocks.
        num_keep: ``k``, how many to keep (``1 <= k <= n``). ``k = 1`` keeps the first middle block.

    Raises:
        ValueError: if ``num_keep`` is outside ``[1, num_middle]``.

    Example:
        >>> uniform_keep_indices(20, 8)
        [0, 3, 5, 8, 11, 14, 16, 19]
    """
    if num_middle < 1:
        raise ValueError(f"`num_middle={num_middle}` must be >= 1.")
    if not 1 <= num_keep <= num_middle:
        raise ValueError(f"`emulator_layers={num_keep}` must be in [1, {num_middle}] (the number of middle blocks).")
    if num_keep == 1:
        return [0]
    stride = (num_middle - 1) / (num_keep - 1)
    return [round(i * stride) for i in range(num_keep)]


def uniform_keep_layers(num_layers: int, num_keep: int, bottom: int = 2, top: int = 2) -> list[int]:
    """Absolute block indices kept by the ``bottom``-``num_keep``-``top`` emulator of an ``num_layers`` model.

    Example:
        >>> uniform_keep_layers(24, 8)  # OPT-1.3B 2-8-2
        [2, 5, 7, 10, 13, 16, 18, 21]
    """
    split = SandwichSplit(num_layers, bottom, top)
    middle = split.middle_indices
    return [middle[j] for j in uniform_keep_indices(len(middle), num_keep)]
