"""Which clients train in a round: uniform sampling without replacement, dropout and stragglers.

FedPepTAO's code samples ``M = ceil(fraction * N)`` clients per round uniformly without replacement (arXiv
2310.15080, spec §5). privtune adds two failure modes of real deployments: a fraction of the sampled clients
never reports (dropout), and a fraction reports after fewer local steps (stragglers; their ``K_i`` is what they
actually ran). All draws derive from ``(seed, round)``, so any rank or a resumed run makes the same draws.

Threat model: none; sampling is public server logic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def check_fraction(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is in ``(0, 1]`` (or ``[0, 1)`` with ``allow_zero``)."""
    ok = 0.0 <= value < 1.0 if allow_zero else 0.0 < value <= 1.0
    if not ok:
        allowed = "[0, 1)" if allow_zero else "(0, 1]"
        raise ValueError(f"`{name}` must be in {allowed}; got {value}.")


@dataclass
class RoundPlan:
    """The clients of one round.

    Attributes:
        sampled: the clients asked to train (in the order the server processes them).
        dropped: sampled clients that never report.
        stragglers: reporting clients that run only a fraction of their local steps.
    """

    sampled: list[int]
    dropped: list[int]
    stragglers: list[int]

    @property
    def reporting(self) -> list[int]:
        """Sampled minus dropped, in sampling order."""
        return [c for c in self.sampled if c not in self.dropped]


def plan_round(
    round_idx: int,
    num_clients: int,
    sample_fraction: float,
    seed: int,
    dropout_fraction: float = 0.0,
    straggler_fraction: float = 0.0,
) -> RoundPlan:
    """Sample ``ceil(fraction * N)`` clients, then drop and slow down fractions of them (at least one reports).

    Raises:
        ValueError: if a fraction is outside its range.
    """
    check_fraction("sample_fraction", sample_fraction)
    check_fraction("dropout_fraction", dropout_fraction, allow_zero=True)
    check_fraction("straggler_fraction", straggler_fraction, allow_zero=True)
    rng = np.random.default_rng([seed, round_idx])
    m = max(1, math.ceil(sample_fraction * num_clients - 1e-9))
    sampled = [int(c) for c in rng.choice(num_clients, size=m, replace=False)]
    n_drop = min(m - 1, int(math.floor(dropout_fraction * m)))
    dropped = [int(c) for c in rng.choice(sampled, size=n_drop, replace=False)] if n_drop else []
    reporting = [c for c in sampled if c not in dropped]
    n_slow = int(math.floor(straggler_fraction * len(reporting)))
    stragglers = [int(c) for c in rng.choice(reporting, size=n_slow, replace=False)] if n_slow else []
    return RoundPlan(sampled=sampled, dropped=sorted(dropped), stragglers=sorted(stragglers))


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """A per-(run, round, client) seed for data order and dropout, the same on every rank."""
    return int(np.random.default_rng([seed, round_idx, client_id, 7919]).integers(0, 2**31 - 1))
