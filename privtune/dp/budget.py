"""The privacy budget of DP-SGD: noise for a target, ``epsilon`` spent, and steps left before the target.

DP-SGD with Poisson sampling is the Sampled Gaussian Mechanism; its ``(epsilon, delta)`` after a sequence of steps
``history = [(sigma, q, steps), ...]`` comes from an accountant: RDP (Mironov, arXiv 1702.07476; Mironov et al.,
arXiv 1908.10530), cheap and a little loose, or PRV (Gopi et al., arXiv 2106.02848), tight and about 5-50x slower
per call. Both are Opacus' implementations (arXiv 2109.12298), so the figures equal Opacus'.

:func:`steps_within_budget` is the hard cap: the largest number of further steps whose ``epsilon`` stays at or
below the target, found with a few accountant calls (doubling, then bisection) so that training checks an integer
per step instead of calling an accountant.

Threat model: as for DP-SGD; the figures are upper bounds on what the released model reveals about one example.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal

import numpy as np

__all__ = ["Accountant", "History", "epsilon_spent", "noise_for", "require_opacus", "steps_within_budget"]

Accountant = Literal["prv", "rdp"]
History = list[tuple[float, float, int]]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
_MAX_STEPS = 10**8


def require_opacus() -> Any:  # noqa: ANN401 - the opacus module
    """Import opacus, or say how to install it."""
    try:
        import opacus
    except ImportError as err:
        raise ImportError(
            "DP-SGD needs the optional dependency `opacus` (>= 1.5): pip install 'privtune[dp]' "
            "(or: pip install opacus)."
        ) from err
    return opacus


@functools.lru_cache(maxsize=512)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one step at Opacus' default orders (RDP composes additively: ``k`` steps cost ``k`` times this)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


def _rdp_epsilon(history: History, delta: float) -> float:
    """Opacus' ``RDPAccountant.get_epsilon`` (same orders, same sum), with the per-step RDP cached."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(_rdp_per_step(q, s) * n for s, q, n in history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def epsilon_spent(history: History, delta: float, accountant: Accountant = "rdp") -> float:
    """``epsilon(delta)`` of the steps in ``history`` (0 for none, ``inf`` if a step had no noise).

    RDP reuses a cached per-step curve, so a call costs microseconds after the first for a given ``(q, sigma)``;
    PRV runs Opacus' accountant (a fraction of a second per call).
    """
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    require_opacus()
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def noise_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: Accountant = "rdp"
) -> float:
    """``sigma`` that spends at most ``target_epsilon`` over ``steps`` at ``sample_rate`` (Opacus' search).

    Raises:
        ValueError: for a non-positive target, ``delta`` outside (0, 1), ``sample_rate`` outside (0, 1] or
            ``steps < 1``.
    """
    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise ValueError(
            f"`target_epsilon={target_epsilon}` > 0, `delta={delta}` in (0, 1), `sample_rate={sample_rate}` in "
            f"(0, 1] and `steps={steps}` >= 1 required."
        )
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


def steps_within_budget(
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    history: History | None = None,
    accountant: Accountant = "rdp",
    hint: int = 1,
) -> int:
    """The largest ``k`` such that ``history`` plus ``k`` steps at ``(noise_multiplier, sample_rate)`` spends
    at most ``target_epsilon``.

    Args:
        hint: a ``k`` expected to be near the answer (the planned steps left), to save accountant calls.

    Returns:
        ``k >= 0`` (0 if the history alone already reaches the target or there is no noise), at most ``1e8``.
    """
    history = list(history or [])

    def fits(k: int) -> bool:
        return epsilon_spent([*history, (noise_multiplier, sample_rate, k)], delta, accountant) <= target_epsilon

    if noise_multiplier <= 0 or not fits(1):
        return 0
    lo, hi = 1, max(2, hint)
    if fits(hi):
        lo = hi
        while hi < _MAX_STEPS:
            hi = min(_MAX_STEPS, hi * 2)
            if not fits(hi):
                break
            lo = hi
        else:
            return lo
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
