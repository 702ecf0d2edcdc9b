"""Split a labelled dataset across federated clients: IID, Dirichlet label skew, Dirichlet size skew.

Dirichlet label skew is the FedPepTAO code's algorithm (arXiv 2310.15080, spec §9), not flwr-datasets'
``DirichletPartitioner``::

    quotas n_k <- round(Dir(size_alpha 1_N) |D|), fixed so that sum n_k = |D| (and every n_k >= 1)
    q_k ~ Dir(alpha 1_C)                       class prior of client k
    pools[c] <- shuffled indices of class c
    while some client has quota: pick a random client k with quota; draw c ~ q_k (renormalised over non-empty
        pools); give k the next index of pools[c]

The evaluation split is divided the same way with the same ``q_k`` and size proportions (personalised evaluation).
``iid`` shuffles and deals equal shares; ``dirichlet_quantity`` draws sizes from ``Dir(size_alpha)`` and deals a
random shuffle. Everything derives from the seed (a NumPy ``Generator``), and :class:`Partition` round-trips to
JSON so a run can be repeated.

Decision (spec leaves it open): every client gets at least one training example; quotas of 0 take one example
from the largest quota.

Threat model: none by itself; the partition simulates which client owns which examples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

PartitionMode = Literal["iid", "dirichlet_label", "dirichlet_quantity"]
MODES: tuple[str, ...] = ("iid", "dirichlet_label", "dirichlet_quantity")


@dataclass
class Partition:
    """Client index lists plus what produced them.

    Attributes:
        indices: ``indices[k]`` are the example indices of client ``k``.
        mode: the partition mode.
        seed: the seed it derives from.
        alpha: label concentration.
        size_alpha: size concentration.
        class_priors: ``q_k`` per client (label modes), reused for the evaluation split.
        proportions: each client's share of the data, reused for the evaluation split.
    """

    indices: list[list[int]]
    mode: str
    seed: int
    alpha: float
    size_alpha: float
    class_priors: list[list[float]] = field(default_factory=list)
    proportions: list[float] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        """``N``."""
        return len(self.indices)

    def sizes(self) -> list[int]:
        """``n_k`` per client."""
        return [len(i) for i in self.indices]

    def label_histograms(self, labels: Sequence[int], num_classes: int) -> list[list[int]]:
        """Per-client label counts ``[N][C]``."""
        arr = np.asarray(labels)
        return [np.bincount(arr[idx], minlength=num_classes).tolist() for idx in self.indices]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "mode": self.mode,
            "seed": self.seed,
            "alpha": self.alpha,
            "size_alpha": self.size_alpha,
            "class_priors": self.class_priors,
            "proportions": self.proportions,
            "indices": self.indices,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def save(self, path: str | Path, labels: Sequence[int] | None = None, num_classes: int | None = None) -> None:
        """Write the partition (and per-client label histograms, when ``labels`` are given) as JSON."""
        data = self.to_dict()
        if labels is not None:
            data["label_histograms"] = self.label_histograms(labels, num_classes or int(max(labels)) + 1)
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        """Read a partition written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        data.pop("label_histograms", None)
        return cls.from_dict(data)


def validate_partition_args(num_examples: int, num_clients: int, mode: str, alpha: float, size_alpha: float) -> None:
    """Raise one ``ValueError`` listing every bad argument, before any work.

    Raises:
        ValueError: if ``mode`` is unknown, ``num_clients < 1``, there are fewer examples than clients, or a
            concentration is ``<= 0``.
    """
    problems = []
    if mode not in MODES:
        problems.append(f"`mode` must be one of {MODES}; got {mode!r}.")
    if num_clients < 1:
        problems.append(f"`num_clients` must be >= 1; got {num_clients}.")
    elif num_examples < num_clients:
        problems.append(
            f"`num_clients={num_clients}` exceeds the {num_examples} examples to split; every client needs at least "
            "one. HINT: lower `num_clients` or use more data."
        )
    if alpha <= 0:
        problems.append(f"`alpha` (Dirichlet label concentration) must be > 0; got {alpha}.")
    if size_alpha <= 0:
        problems.append(f"`size_alpha` (Dirichlet size concentration) must be > 0; got {size_alpha}.")
    if problems:
        raise ValueError(" ".join(problems))


def _quotas(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas summing to ``total`` (largest remainders), each >= 1 when ``total >= len``."""
    raw = proportions * total
    quotas = np.floor(raw).astype(int)
    remainder = total - quotas.sum()
    order = np.argsort(-(raw - quotas), kind="stable")
    quotas[order[:remainder]] += 1
    if total >= len(quotas):
        while (quotas == 0).any():
            quotas[int(np.argmax(quotas))] -= 1
            quotas[int(np.argmin(quotas))] += 1
    return quotas


def _deal_by_prior(
    labels: np.ndarray, quotas: np.ndarray, priors: np.ndarray, rng: np.random.Generator
) -> list[list[int]]:
    num_classes = priors.shape[1]
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)]
    heads = [0] * num_classes
    remaining = quotas.copy()
    out: list[list[int]] = [[] for _ in quotas]
    while remaining.sum() > 0:
        k = int(rng.choice(np.flatnonzero(remaining > 0)))
        prior = priors[k].copy()
        prior[[heads[c] >= len(pools[c]) for c in range(num_classes)]] = 0.0
        if prior.sum() <= 0:  # the client's classes are exhausted: draw from what is left, uniformly
            prior = np.array([float(heads[c] < len(pools[c])) for c in range(num_classes)])
        c = int(rng.choice(num_classes, p=prior / prior.sum()))
        out[k].append(int(pools[c][heads[c]]))
        heads[c] += 1
        remaining[k] -= 1
    return out


def partition_labels(
    labels: Sequence[int],
    num_clients: int,
    mode: PartitionMode = "dirichlet_label",
    alpha: float = 1.0,
    size_alpha: float = 5.0,
    seed: int = 42,
) -> Partition:
    """Split example indices across ``num_clients`` clients.

    Args:
        labels: class index of every example.
        num_clients: ``N``.
        mode: ``iid``, ``dirichlet_label`` or ``dirichlet_quantity``.
        alpha: label concentration (lower = more skew); used by ``dirichlet_label``.
        size_alpha: size concentration (lower = more unequal sizes); used by the Dirichlet modes.
        seed: the only source of randomness.

    Raises:
        ValueError: see :func:`validate_partition_args`.
    """
    validate_partition_args(len(labels), num_clients, mode, alpha, size_alpha)
    arr = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    num_classes = int(arr.max()) + 1
    if mode == "iid":
        proportions = np.full(num_clients, 1.0 / num_clients)
    else:
        proportions = rng.dirichlet(np.full(num_clients, size_alpha))
    quotas = _quotas(proportions, len(arr))
    priors = np.empty((0, num_classes))
    if mode == "dirichlet_label":
        priors = rng.dirichlet(np.full(num_classes, alpha), size=num_clients)
        indices = _deal_by_prior(arr, quotas, priors, rng)
    else:
        order = rng.permutation(len(arr))
        bounds = np.concatenate([[0], np.cumsum(quotas)])
        indices = [sorted(int(i) for i in order[bounds[k] : bounds[k + 1]]) for k in range(num_clients)]
    return Partition(
        indices=indices,
        mode=mode,
        seed=seed,
        alpha=alpha,
        size_alpha=size_alpha,
        class_priors=priors.tolist(),
        proportions=proportions.tolist(),
    )


def partition_like(labels: Sequence[int], reference: Partition, seed_offset: int = 1) -> Partition:
    """Split another set (the evaluation split) with the same class priors and size proportions.

    Clients may get no evaluation example when the split is small; personalised evaluation pools predictions over
    clients, so that is allowed here.
    """
    arr = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(reference.seed + seed_offset)
    proportions = np.asarray(reference.proportions)
    quotas = _quotas(proportions, len(arr))
    if reference.mode == "dirichlet_label":
        priors = np.asarray(reference.class_priors)
        num_classes = max(int(arr.max()) + 1, priors.shape[1])
        if priors.shape[1] < num_classes:
            priors = np.pad(priors, ((0, 0), (0, num_classes - priors.shape[1])))
        indices = _deal_by_prior(arr, quotas, priors, rng)
    else:
        order = rng.permutation(len(arr))
        bounds = np.concatenate([[0], np.cumsum(quotas)])
        indices = [sorted(int(i) for i in order[bounds[k] : bounds[k + 1]]) for k in range(reference.num_clients)]
    return Partition(
        indices=indices,
        mode=reference.mode,
        seed=reference.seed + seed_offset,
        alpha=reference.alpha,
        size_alpha=reference.size_alpha,
        class_priors=reference.class_priors,
        proportions=reference.proportions,
    )


def mean_tv_distance(partition: Partition, labels: Sequence[int]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    arr = np.asarray(labels)
    num_classes = int(arr.max()) + 1
    glob = np.bincount(arr, minlength=num_classes) / len(arr)
    dists = []
    for idx in partition.indices:
        if not idx:
            continue
        local = np.bincount(arr[idx], minlength=num_classes) / len(idx)
        dists.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(dists))
