"""Deterministic, class-stratified train / validation / test splits."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stratified_split(
    labels: Sequence[int], sizes: Sequence[int | float], seed: int = 0, balanced: bool = False
) -> list[list[int]]:
    """Split example indices into parts of the given sizes, keeping class proportions, reproducibly.

    Each class's indices are shuffled with a seeded generator and dealt to the parts in proportion; a size
    may be a count (int) or a fraction of the whole (float in (0, 1]). Parts are disjoint; examples not
    asked for are left out, so ``sizes=[2000, 500]`` draws a 2,000 / 500 split from a larger corpus.

    Args:
        labels: class index of every example.
        sizes: one size per part.
        seed: the split's seed.
        balanced: give every class the same share of each part (class-balanced evaluation sets) instead
            of the corpus proportions.

    Returns:
        One sorted-by-draw list of indices per part.

    Raises:
        ValueError: if the sizes ask for more examples than there are, or a size is not positive.
    """
    n = len(labels)
    counts = []
    for i, size in enumerate(sizes):
        if isinstance(size, float):
            if not 0.0 < size <= 1.0:
                raise ValueError(f"`sizes[{i}]={size}` must be a count > 0 or a fraction in (0, 1].")
            size = round(size * n)
        if size <= 0:
            raise ValueError(f"`sizes[{i}]={size}` must be positive.")
        counts.append(int(size))
    if sum(counts) > n:
        raise ValueError(f"`sizes={list(sizes)}` ask for {sum(counts)} examples but only {n} exist.")
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for idx, label in enumerate(labels):
        by_class.setdefault(label, []).append(idx)
    pools = {
        c: [idxs[j] for j in torch.randperm(len(idxs), generator=gen).tolist()] for c, idxs in sorted(by_class.items())
    }
    parts: list[list[int]] = []
    for count in counts:
        remaining = sum(len(p) for p in pools.values())
        # Largest-remainder allocation of `count` over classes, in proportion to what each class has left.
        if balanced:
            quotas = {c: count / len(pools) for c in pools}
        else:
            quotas = {c: count * len(p) / remaining for c, p in pools.items()}
        take = {c: int(q) for c, q in quotas.items()}
        for c in sorted(quotas, key=lambda c: quotas[c] - take[c], reverse=True)[: count - sum(take.values())]:
            take[c] += 1
        short = {c: (k, len(pools[c])) for c, k in take.items() if k > len(pools[c])}
        if short:
            raise ValueError(
                f"`sizes={list(sizes)}` with `balanced=True` need more examples of classes {sorted(short)} "
                f"than remain (wanted, left: {short}); ask for smaller parts."
            )
        part: list[int] = []
        for c, k in take.items():
            part.extend(pools[c][:k])
            pools[c] = pools[c][k:]
        order = torch.randperm(len(part), generator=gen).tolist()
        parts.append([part[j] for j in order])
    return parts
