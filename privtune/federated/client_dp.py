"""Client-level differential privacy for federated rounds: DP-FedAvg with optional adaptive clipping.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018,
arXiv 1710.06963). Per round ``r`` the server samples ``m`` of ``N`` clients (``q = m / N``); then

* each client's update ``Delta_i`` (its communicated tensors minus the global ones) is clipped to norm ``C``:
  ``Delta_i <- Delta_i * min(1, C / ||Delta_i||_2)``, the norm taken over all communicated tensors together;
* the server sums the clipped updates, adds ``N(0, (z C)^2)`` per coordinate and divides by ``m`` (the
  fixed-denominator estimator: a client that drops out contributes zero and the sensitivity stays ``C / m``);
* the privacy loss is that of the sampled Gaussian mechanism with noise multiplier ``z`` and sampling rate ``q``,
  composed once per round, accounted with Renyi DP (Mironov 2017; Opacus' RDP functions) and converted to
  ``(epsilon, delta)``.

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021,
arXiv 1905.03871): each client also reports ``b_i = 1[||Delta_i|| <= C]``; the server releases
``b~ = (sum_i b_i + N(0, sigma_b^2)) / m`` and moves ``C <- C exp(-eta_C (b~ - gamma))`` towards the
``gamma``-quantile of the update norms. The two releases together are one Gaussian mechanism with noise
multiplier ``z = (z_Delta^-2 + (2 sigma_b)^-2)^(-1/2)``, so for a given ``z`` the update noise uses
``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Theorem 1 of the paper; the same formula as Flower's
``compute_adaptive_noise_params``). Flower's adaptive wrappers count the *clipped* updates against the target
and update ``C`` before noising; this module follows the paper (the unclipped fraction, noise with the ``C`` used
to clip).

The clipping and the noise scale equal Flower's ``DifferentialPrivacyServerSideFixedClipping`` (flwr 1.42,
``compute_clip_model_update`` and ``compute_stdv = z C / m``) on the same inputs; see ``tests/test_client_dp.py``.
Any server optimizer applied to the noisy mean afterwards (FedAdam, FedPepTAO's) is post-processing and costs
no privacy. The mean must be uniform: weighting by example counts breaks the ``C / m`` sensitivity bound.

Threat model: client-level DP. The server, and anyone who sees the global model or its history, learns at most
``(epsilon, delta)`` about whether any one client took part (all of its data at once), provided the server
runs this mechanism honestly. It does not hide a client's update from the server itself (that needs secure
aggregation or local DP). The accountant assumes each client is sampled independently with probability ``q``
(Poisson sampling, as in McMahan et al.); fixed-size cohorts of ``m`` are the usual approximation of it.

Pure torch; Opacus (optional dependency ``privtune[dp]``) provides the RDP functions.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from privtune.federated.aggregate import AggregationError, State, check_compatible


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would spend more than the target epsilon."""


def _require_rdp() -> tuple[Any, Any, list[float]]:
    try:
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
        from opacus.accountants.rdp import RDPAccountant
    except ImportError as err:
        raise ImportError(
            "ClientLevelDP needs the optional dependency `opacus` (>= 1.5) for its RDP accountant: "
            "pip install 'privtune[dp]' (or: pip install opacus)."
        ) from err
    return compute_rdp, get_privacy_spent, list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=64)
def _rdp_per_round(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    compute_rdp, _, orders = _require_rdp()
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)
    return tuple(float(r) for r in rdp)


def rdp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """``epsilon`` of ``rounds`` compositions of the sampled Gaussian mechanism ``(z, q)`` at ``delta`` (RDP).

    The same numbers as Opacus' ``RDPAccountant`` with ``history = [(z, q, rounds)]`` and its default orders
    (RDP composes additively, so the one-round RDP is computed once and scaled). Opacus warns when the best order
    is the largest one (a looser, still valid bound); that warning is silenced here.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    _, get_privacy_spent, orders = _require_rdp()
    rdp = [r * rounds for r in _rdp_per_round(float(noise_multiplier), float(sample_rate))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _noise_for_target(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The smallest ``z`` (to Opacus' search tolerance) with ``epsilon(z, q, rounds) < target`` (Opacus' search)."""
    _require_rdp()
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=rounds,
            accountant="rdp",
            epsilon_tolerance=0.005,
        )
    )


def update_norm(update: Mapping[str, Tensor]) -> float:
    """``||Delta||_2`` over all tensors of ``update`` together (float64)."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in update.values())
    return math.sqrt(total)


class ClientLevelDP:
    """Clip each client's update, noise the uniform mean, account epsilon per round (DP-FedAvg).

    Give exactly one of ``noise_multiplier`` (``z``, accounted as given) and ``target_epsilon`` (``z`` is the
    smallest the RDP accountant allows for the planned rounds, found in :meth:`plan`).

    Args:
        clipping_norm: ``C`` (the initial ``C`` when ``adaptive``; Andrew et al. suggest 0.1).
        noise_multiplier: ``z``; 0 adds no noise (epsilon is then infinite).
        target_epsilon: the budget; the run stops before the round that would exceed it.
        delta: ``delta`` of the guarantee; :meth:`plan` refuses ``delta >= 1 / N``.
        adaptive: move ``C`` towards the ``target_unclipped_quantile`` of the update norms (Andrew et al.).
        target_unclipped_quantile: ``gamma``, the fraction of updates that should not be clipped (0.5: median).
        clip_learning_rate: ``eta_C`` of the geometric update (0.2 in the paper).
        clipped_count_stddev: ``sigma_b`` of the noise on the unclipped count; ``None``: ``m / 20`` (the paper's
            recommendation, Flower's default).

    Raises:
        ValueError: if both or neither of ``noise_multiplier`` and ``target_epsilon`` are given, or a value is out
            of range.

    Example::

        dp = ClientLevelDP(target_epsilon=3.0, clipping_norm=0.5, delta=1e-4)
        dp.plan(num_rounds=50, sample_rate=10 / 100, clients_per_round=10)
        while dp.round_allowed(dp.rounds + 1):
            deltas = [...]                                    # client state minus global state, per client
            clipped, unclipped = dp.clip_all(deltas)
            noisy_mean = dp.aggregate(clipped, generator, unclipped=unclipped)
    """

    def __init__(
        self,
        *,
        clipping_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        adaptive: bool = False,
        target_unclipped_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "ClientLevelDP takes exactly one of `noise_multiplier` and `target_epsilon`; got "
                f"noise_multiplier={noise_multiplier}, target_epsilon={target_epsilon}."
            )
        if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"`noise_multiplier` must be a finite number >= 0; got {noise_multiplier}.")
        if target_epsilon is not None and not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise ValueError(
                f"`target_epsilon` must be a finite number > 0; got {target_epsilon} (for no privacy, leave "
                "ClientLevelDP out)."
            )
        if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
            raise ValueError(f"`clipping_norm` must be a finite number > 0; got {clipping_norm}.")
        if not 0 < delta < 1:
            raise ValueError(f"`delta` must be in (0, 1); got {delta}.")
        if not 0 <= target_unclipped_quantile <= 1:
            raise ValueError(f"`target_unclipped_quantile` must be in [0, 1]; got {target_unclipped_quantile}.")
        if clip_learning_rate <= 0:
            raise ValueError(f"`clip_learning_rate` must be > 0; got {clip_learning_rate}.")
        if clipped_count_stddev is not None and clipped_count_stddev <= 0:
            raise ValueError(f"`clipped_count_stddev` must be > 0 (or None for m / 20); got {clipped_count_stddev}.")
        self.clipping_norm = float(clipping_norm)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.delta = float(delta)
        self.adaptive = adaptive
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        self.clipped_count_stddev = clipped_count_stddev
        # resolved by plan()
        self.num_rounds: int | None = None
        self.sample_rate: float | None = None
        self.clients_per_round: int | None = None
        self.update_noise_multiplier: float | None = None  # z_Delta (= z without adaptive clipping)
        self.count_stddev: float = 0.0  # sigma_b in use
        self.rounds = 0  # noisy aggregates released

    # --- planning and accounting --------------------------------------------------------------------------------
    @property
    def planned(self) -> bool:
        """Whether :meth:`plan` has run (or a planned state was loaded)."""
        return self.update_noise_multiplier is not None

    def plan(self, num_rounds: int, sample_rate: float, clients_per_round: int) -> float:
        """Fix ``q``, ``m`` and ``z`` for a run of ``num_rounds``; returns the accounted noise multiplier ``z``.

        Args:
            num_rounds: rounds the run is planned for (``target_epsilon`` is spread over them).
            sample_rate: ``q = m / N``.
            clients_per_round: ``m``, the sampled clients per round (the noise is ``z C / m`` on the mean).

        Raises:
            ValueError: if a value is out of range, ``delta >= 1 / N``, the target is unreachable, or adaptive
                clipping's count noise is too small for ``z`` (``z >= 2 sigma_b``).
        """
        if num_rounds < 1:
            raise ValueError(f"`num_rounds` must be >= 1; got {num_rounds}.")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"`sample_rate` (sampled clients / all clients) must be in (0, 1]; got {sample_rate}.")
        if clients_per_round < 1:
            raise ValueError(f"`clients_per_round` must be >= 1; got {clients_per_round}.")
        num_clients = clients_per_round / sample_rate
        if self.delta >= 1 / num_clients:
            raise ValueError(
                f"ClientLevelDP: `delta`={self.delta} must be well below 1 / N = {1 / num_clients:.3g} "
                f"(N = {num_clients:.0f} clients); set delta <= {0.1 / num_clients:.1g}."
            )
        if self.target_epsilon is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the")
                try:
                    z = _noise_for_target(self.target_epsilon, self.delta, sample_rate, num_rounds)
                except ValueError as err:
                    raise ValueError(
                        f"ClientLevelDP: target_epsilon={self.target_epsilon} at delta={self.delta} cannot be met "
                        f"in {num_rounds} rounds at q={sample_rate:.3g}; raise `target_epsilon` or lower "
                        "`num_rounds`."
                    ) from err
            self.noise_multiplier = z
        z = float(self.noise_multiplier)  # type: ignore[arg-type]
        z_delta, sigma_b = z, 0.0
        if self.adaptive and z > 0:
            sigma_b = self.clipped_count_stddev if self.clipped_count_stddev is not None else clients_per_round / 20
            if z >= 2 * sigma_b:
                raise ValueError(
                    f"ClientLevelDP(adaptive=True): the noise multiplier {z:.4g} needs `clipped_count_stddev` > "
                    f"{z / 2:.4g} (got {sigma_b:.4g}; the default is clients_per_round / 20); raise it or sample more "
                    "clients per round."
                )
            z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
        self.num_rounds, self.sample_rate = int(num_rounds), float(sample_rate)
        self.clients_per_round = int(clients_per_round)
        self.update_noise_multiplier, self.count_stddev = z_delta, sigma_b
        return z

    def _require_plan(self) -> None:
        if not self.planned:
            raise RuntimeError(
                "ClientLevelDP: call plan(num_rounds, sample_rate, clients_per_round) before clipping or aggregating."
            )

    def epsilon(self, rounds: int | None = None) -> float:
        """``epsilon`` after ``rounds`` released aggregates (default: those released so far) at ``delta``."""
        self._require_plan()
        rounds = self.rounds if rounds is None else int(rounds)
        return rdp_epsilon(float(self.noise_multiplier), float(self.sample_rate), rounds, self.delta)  # type: ignore[arg-type]

    def round_allowed(self, next_round: int) -> bool:
        """Whether releasing round ``next_round`` (1-based) keeps epsilon within ``target_epsilon``.

        Without a target every round is allowed (epsilon is still reported).
        """
        self._require_plan()
        if self.target_epsilon is None:
            return True
        return self.epsilon(next_round) <= self.target_epsilon

    # --- the mechanism ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def clip(self, update: Mapping[str, Tensor]) -> State:
        """``Delta * min(1, C / ||Delta||)`` with the norm over all tensors together (float32 out)."""
        norm = update_norm(update)
        factor = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
        return {k: t.detach().float() * factor for k, t in update.items()}

    def clip_all(self, updates: Sequence[Mapping[str, Tensor]]) -> tuple[list[State], list[bool]]:
        """Clip every update; also return ``b_i = ||Delta_i|| <= C`` (the adaptive-clipping indicator)."""
        clipped = [self.clip(u) for u in updates]
        unclipped = [update_norm(u) <= self.clipping_norm for u in updates]
        return clipped, unclipped

    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise on the mean: ``z_Delta C / m`` (Flower's ``compute_stdv``)."""
        self._require_plan()
        return float(self.update_noise_multiplier) * self.clipping_norm / int(self.clients_per_round)  # type: ignore[arg-type]

    @torch.no_grad()
    def aggregate(
        self,
        clipped: Sequence[Mapping[str, Tensor]],
        generator: torch.Generator,
        unclipped: Sequence[bool] | None = None,
    ) -> State:
        """Release one round: ``(sum_i clipped_i + N(0, (z_Delta C)^2)) / m``; counts the round.

        Args:
            clipped: the reporting clients' clipped updates (from :meth:`clip`); at most ``m`` of them.
            generator: draws the noise (seed it for reproducible runs; keep it secret in deployments).
            unclipped: ``b_i`` per update (from :meth:`clip_all`); required with ``adaptive=True``.

        Raises:
            PrivacyBudgetExhausted: if this round would spend more than ``target_epsilon``.
            AggregationError: if no update, more than ``m`` updates, or mismatched tensors are given.
            ValueError: if ``adaptive`` and ``unclipped`` is missing or of another length.
        """
        self._require_plan()
        m = int(self.clients_per_round)  # type: ignore[arg-type]
        if not clipped:
            raise AggregationError("ClientLevelDP: cannot aggregate zero client updates.")
        if len(clipped) > m:
            raise AggregationError(
                f"ClientLevelDP: got {len(clipped)} updates but planned clients_per_round={m}; the noise is "
                "calibrated to m, so plan() with the real cohort size."
            )
        check_compatible(clipped[0], clipped[1:], start=1)
        if self.adaptive and (unclipped is None or len(unclipped) != len(clipped)):
            raise ValueError(
                "ClientLevelDP(adaptive=True): pass `unclipped` (one bool per update, from clip_all) to aggregate; "
                f"got {None if unclipped is None else len(unclipped)} for {len(clipped)} updates."
            )
        if not self.round_allowed(self.rounds + 1):
            raise PrivacyBudgetExhausted(
                f"ClientLevelDP: round {self.rounds + 1} would spend epsilon={self.epsilon(self.rounds + 1):.4g} > "
                f"target_epsilon={self.target_epsilon} (spent {self.epsilon():.4g} in {self.rounds} rounds); stop "
                "here or plan with a larger budget."
            )
        c = self.clipping_norm
        std_sum = float(self.update_noise_multiplier) * c  # type: ignore[arg-type]
        out: State = {}
        for name, ref in clipped[0].items():
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for state in clipped:
                acc += state[name].detach().double().cpu()
            if std_sum > 0:
                acc += torch.normal(0.0, std_sum, ref.shape, generator=generator, dtype=torch.float64)
            out[name] = (acc / m).float()
        if self.adaptive:
            count = float(sum(bool(b) for b in unclipped))  # type: ignore[union-attr]
            if self.count_stddev > 0:
                count += float(torch.normal(0.0, self.count_stddev, (1,), generator=generator, dtype=torch.float64))
            self.clipping_norm = c * math.exp(-self.clip_learning_rate * (count / m - self.target_unclipped_quantile))
        self.rounds += 1
        return out

    def private_mean(
        self,
        global_state: Mapping[str, Tensor],
        client_states: Sequence[Mapping[str, Tensor]],
        generator: torch.Generator,
    ) -> State:
        """``global + noisy mean of clipped (client - global)``: the ``averaged`` state a server optimizer takes.

        Raises:
            AggregationError: if a client's tensors differ from ``global_state``'s names or shapes.
        """
        check_compatible(global_state, client_states)
        base = {k: t.detach().float() for k, t in global_state.items()}
        deltas = [{k: s[k].detach().float() - base[k] for k in base} for s in client_states]
        clipped, unclipped = self.clip_all(deltas)
        mean = self.aggregate(clipped, generator, unclipped=unclipped)
        return {k: base[k] + mean[k] for k in base}

    # --- checkpoints and reports -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain floats/ints/bools (loadable with ``torch.load(..., weights_only=True)``)."""
        return {
            "clipping_norm": self.clipping_norm,
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "adaptive": self.adaptive,
            "num_rounds": self.num_rounds,
            "sample_rate": self.sample_rate,
            "clients_per_round": self.clients_per_round,
            "update_noise_multiplier": self.update_noise_multiplier,
            "count_stddev": self.count_stddev,
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses one from another privacy configuration.

        Raises:
            ValueError: if ``target_epsilon``, ``delta`` or ``adaptive`` differ from this object's, or (once
                planned) ``num_rounds``, ``sample_rate`` or ``clients_per_round`` do.
        """
        for key in ("target_epsilon", "delta", "adaptive"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"ClientLevelDP checkpoint has {key}={state[key]}, this run has {key}={getattr(self, key)}; "
                    "resume with the same privacy settings or start a new run."
                )
        if self.target_epsilon is None and state["noise_multiplier"] != self.noise_multiplier:
            raise ValueError(
                f"ClientLevelDP checkpoint has noise_multiplier={state['noise_multiplier']}, this run has "
                f"{self.noise_multiplier}; resume with the same noise multiplier."
            )
        if self.planned:
            for key in ("num_rounds", "sample_rate", "clients_per_round"):
                if state[key] != getattr(self, key):
                    raise ValueError(
                        f"ClientLevelDP checkpoint was planned with {key}={state[key]}, this run with "
                        f"{key}={getattr(self, key)}; resume with the same federation and rounds."
                    )
        self.clipping_norm = float(state["clipping_norm"])
        self.noise_multiplier = state["noise_multiplier"]
        self.num_rounds, self.sample_rate = state["num_rounds"], state["sample_rate"]
        self.clients_per_round = state["clients_per_round"]
        self.update_noise_multiplier, self.count_stddev = state["update_noise_multiplier"], float(state["count_stddev"])
        self.rounds = int(state["rounds"])

    def describe(self) -> dict[str, Any]:
        """Settings and spend, for logs and reports."""
        info = {
            "name": type(self).__name__,
            "clipping_norm": self.clipping_norm,
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "adaptive": self.adaptive,
            "sample_rate": self.sample_rate,
            "clients_per_round": self.clients_per_round,
            "rounds": self.rounds,
        }
        if self.planned:
            info["epsilon"] = self.epsilon()
        return info
