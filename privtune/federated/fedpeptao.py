"""The FedPepTAO server: FedAvg, then momentum with control-variate drift correction, all on the server.

FedPepTAO (Che et al., EMNLP 2023, arXiv 2310.15080), server side as in the official code (§7 of the spec). All
state lives on the server and is computed from the uploaded prompt slices, so the correction adds no traffic.

Per round, with uploads ``(w_i, K_i, n_i)`` of the sampled clients ``S``, ``p_i = n_i / sum n``::

    w_bar = sum p_i w_i                                   # FedAvg
    D_t   = w - w_bar                                     # pseudo-gradient (old - new)
    c_i+  = c_i - c + (w - w_i) / (K_i eta_l);  dc_i = c_i+ - c_i
    c    <- c + (|S| / N) sum K_i dc_i / sum K_i
    round 1 and server_step_round1 = "skip":  D_prev <- D_t;  w <- w_bar;  c_i <- c_i+;  done
    g = D_prev - D_t ("delta_diff") or D_t ("delta");  D_prev <- D_t
    eta_s <- max(decay eta_s, eta_min)                    # before use when decay_before_step
    round_start:  m_i = beta m + (1 - beta) g + (c - c_i+);  w = sum p_i (w_bar - eta_s m_i);  m = sum p_i m_i
    chained:      mu <- m;  for i in S (in order): mu <- beta mu + (1 - beta) g + (c - c_i+);  w_i' = w_bar - eta_s mu
                  w = sum p_i w_i';  m <- mu
    c_i <- c_i+

The released code's ambiguities are explicit options (:class:`FedPepTAOOptions`, presets ``code`` and ``clean``).

Threat model: the server sees the selected prompt slices of the sampled clients and nothing else.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from privtune.federated.aggregate import ClientUpdate, State, normalized_weights
from privtune.federated.fedopt import ServerOptimizer

ServerGrad = Literal["delta_diff", "delta"]
MomentumMode = Literal["chained", "round_start"]
Round1 = Literal["skip", "apply"]


@dataclass
class FedPepTAOOptions:
    """The released code's ambiguities as named options (spec §8).

    Attributes:
        server_grad: ``delta_diff`` (code: ``g = D_{t-1} - D_t``) or ``delta`` (FedAvgM-style ``g = D_t``).
        momentum_mode: ``chained`` (one buffer aliased across clients, code) or ``round_start``.
        reset_local_opt_each_round: a fresh client AdamW every round (clean) or the client's saved state (code).
        local_zero_grad: zero the gradient before each local step (the GPT-2/LLaMA code accumulates instead).
        server_step_round1: ``skip`` the server step in round 1 (w = w_bar) or ``apply`` it.
        server_lr: initial ``eta_s``.
        server_lr_decay: multiplier on ``eta_s`` each round.
        server_lr_min: floor of ``eta_s``.
        decay_before_step: decay ``eta_s`` before using it (the first step then uses ``0.99 * 0.05``).
        momentum: ``beta``.
        cv_local_lr: ``eta_l`` in the control-variate update (the nominal local lr, not Adam's effective step).
        personalization: unselected layers' prefixes stay local (the released configuration).

    Raises:
        ValueError: on a value outside its allowed set or range.
    """

    server_grad: ServerGrad = "delta_diff"
    momentum_mode: MomentumMode = "chained"
    reset_local_opt_each_round: bool = False
    local_zero_grad: bool = True
    server_step_round1: Round1 = "skip"
    server_lr: float = 0.05
    server_lr_decay: float = 0.99
    server_lr_min: float = 1e-4
    decay_before_step: bool = True
    momentum: float = 0.9
    cv_local_lr: float = 0.04
    personalization: bool = True

    def __post_init__(self) -> None:
        choices = {
            "server_grad": ("delta_diff", "delta"),
            "momentum_mode": ("chained", "round_start"),
            "server_step_round1": ("skip", "apply"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}; got {getattr(self, name)!r}.")
        if self.server_lr < 0:
            raise ValueError(f"`server_lr` must be >= 0; got {self.server_lr}.")
        if not 0.0 < self.server_lr_decay <= 1.0:
            raise ValueError(f"`server_lr_decay` must be in (0, 1]; got {self.server_lr_decay}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1); got {self.momentum}.")
        if self.cv_local_lr <= 0:
            raise ValueError(f"`cv_local_lr` must be > 0; got {self.cv_local_lr}.")
        if not self.personalization:
            raise ValueError(
                "`personalization=False` (masking unselected layers' prefixes out of attention) is not implemented; "
                "allowed: True."
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FedPepTAOOptions:
        """``code`` (faithful to the released code) or ``clean`` (spec §8), with keyword overrides."""
        presets = {
            "code": {
                "server_grad": "delta_diff",
                "momentum_mode": "chained",
                "reset_local_opt_each_round": False,
                "local_zero_grad": True,
            },
            "clean": {
                "server_grad": "delta",
                "momentum_mode": "round_start",
                "reset_local_opt_each_round": True,
                "local_zero_grad": True,
            },
        }
        if name not in presets:
            raise ValueError(f"`preset` must be one of {tuple(presets)}; got {name!r}.")
        return cls(**{**presets[name], **overrides})


def _zeros(like: State) -> State:
    return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in like.items()}


def _step_against_fedavg(w: State, w_bar: State, new_w: State) -> dict[str, float]:
    """How the server's step compares with FedAvg's step ``w_bar - w`` (a drift diagnostic, logged per round).

    ``server/correction_over_fedavg`` is ``|new_w - w_bar| / |w_bar - w|``: the size of what momentum and the
    control variates add to FedAvg, relative to FedAvg's own step (above 1, the correction outweighs the clients'
    average). ``server/cos_step_fedavg`` is the cosine of ``new_w - w`` with ``w_bar - w`` (negative: the server
    moves against the clients' average).
    """
    fedavg = torch.cat([(w_bar[k] - w[k]).flatten().float() for k in w])
    step = torch.cat([(new_w[k] - w[k]).flatten().float() for k in w])
    extra = torch.cat([(new_w[k] - w_bar[k]).flatten().float() for k in w])
    norm = float(fedavg.norm())
    return {
        "server/correction_over_fedavg": float(extra.norm()) / max(norm, 1e-12),
        "server/cos_step_fedavg": float(torch.nn.functional.cosine_similarity(step, fedavg, dim=0)),
    }


class FedPepTAOServer(ServerOptimizer):
    """Server state (``w`` is the global state passed to :meth:`step`; ``m``, ``c``, ``c_i``, ``D_prev``, ``eta_s``).

    In a config: ``server: {class_path: privtune.federated.FedPepTAOServer, init_args: {preset: clean}}`` or
    ``init_args: {options: {server_grad: delta, momentum: 0.8}}`` (every field of :class:`FedPepTAOOptions`,
    type-checked).

    Args:
        num_clients: ``N``; ``None``: the run's client count, set by :meth:`bind`.
        options: a :class:`FedPepTAOOptions` (default: the ``code`` preset).
        preset: ``code`` or ``clean`` (spec §8); an alternative to ``options``, not both.
        adaptive_names: the tensors the momentum / control-variate step applies to (``None``: all when used on
            its own; in a run, :meth:`bind` sets the prompt tensors). Others get the FedAvg value ``w_bar``: the
            spec's server state covers the prompt slices only, and an encoder's classification head (absent from
            the FedPepTAO code, which used an MLM verbalizer) is averaged.

    Raises:
        ValueError: if ``num_clients < 1``, or both ``options`` and ``preset`` are given.
    """

    def __init__(
        self,
        *,
        num_clients: int | None = None,
        options: FedPepTAOOptions | None = None,
        preset: Literal["code", "clean"] | None = None,
        adaptive_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.adaptive_names = None if adaptive_names is None else list(adaptive_names)
        if num_clients is not None and num_clients < 1:
            raise ValueError(f"`num_clients` must be >= 1; got {num_clients}.")
        if options is not None and preset is not None:
            raise ValueError(
                f"FedPepTAOServer: give `preset` ({preset!r}) or `options`, not both; a preset is a named set of "
                "options (code, clean)."
            )
        self.num_clients = num_clients
        self.options = FedPepTAOOptions.preset(preset) if preset is not None else options or FedPepTAOOptions()
        self.preset = preset
        self.client_lr = None
        self.client_reset_optimizer = self.options.reset_local_opt_each_round
        self.client_zero_grad = self.options.local_zero_grad
        self.eta_s = self.options.server_lr
        self.m: State | None = None
        self.c: State | None = None
        self.c_clients: dict[int, State] = {}
        self.delta_prev: State | None = None
        self.diagnostics: dict[str, float] = {}
        self._against_rounds, self._drift_warned = 0, False

    def bind(self, *, num_clients: int, prompt_names: Sequence[str], client_lr: float) -> None:
        if self.num_clients is not None and self.num_clients != num_clients:
            raise ValueError(
                f"FedPepTAOServer was built with `num_clients={self.num_clients}` but the data has {num_clients} "
                "clients; leave `num_clients` unset (the run sets it)."
            )
        self.num_clients = num_clients
        if self.adaptive_names is None:
            self.adaptive_names = list(prompt_names)

    def update(self, w: State, w_bar: State, updates: Sequence[ClientUpdate]) -> State:
        if self.adaptive_names is None:
            return self._adaptive_update(w, w_bar, updates)
        names = [k for k in w if k in self.adaptive_names]
        out = self._adaptive_update(
            {k: w[k] for k in names},
            {k: w_bar[k] for k in names},
            [ClientUpdate(u.client_id, {k: u.state[k] for k in names}, u.num_examples, u.num_steps) for u in updates],
        )
        return {k: out[k] if k in out else w_bar[k] for k in w}

    def _adaptive_update(self, w: State, w_bar: State, updates: Sequence[ClientUpdate]) -> State:
        opt = self.options
        p = normalized_weights([u.num_examples for u in updates]).float()
        if self.m is None:
            self.m, self.c = _zeros(w), _zeros(w)
        assert self.m is not None
        assert self.c is not None
        delta = {k: w[k] - w_bar[k] for k in w}
        # control variates of the sampled clients, from their uploads
        c_plus: list[State] = []
        for u in updates:
            if u.num_steps < 1:
                raise ValueError(f"client {u.client_id} reported `num_steps={u.num_steps}`; FedPepTAO needs K_i >= 1.")
            c_i = self.c_clients.get(u.client_id) or _zeros(w)
            c_plus.append({k: c_i[k] - self.c[k] + (w[k] - u.state[k]) / (u.num_steps * opt.cv_local_lr) for k in w})
        steps = torch.tensor([float(u.num_steps) for u in updates])
        if self.num_clients is None:
            raise ValueError("FedPepTAOServer needs `num_clients`: pass it, or call `bind()` (the run does).")
        rate = len(updates) / self.num_clients
        c_new = {}
        for k in w:
            acc = torch.zeros_like(w[k])
            for u, cp, k_i in zip(updates, c_plus, steps):
                c_i = self.c_clients.get(u.client_id)
                acc += k_i * (cp[k] - (c_i[k] if c_i is not None else 0.0))
            c_new[k] = self.c[k] + rate * acc / steps.sum()
        self.c = c_new

        def commit_client_variates() -> None:
            for u, cp in zip(updates, c_plus):
                self.c_clients[u.client_id] = cp

        if self.round == 1 and opt.server_step_round1 == "skip":
            self.delta_prev = delta
            commit_client_variates()
            return w_bar
        if opt.server_grad == "delta_diff":
            prev = self.delta_prev if self.delta_prev is not None else _zeros(w)
            g = {k: prev[k] - delta[k] for k in w}
        else:
            g = delta
        self.delta_prev = delta
        if opt.decay_before_step:
            self.eta_s = max(opt.server_lr_decay * self.eta_s, opt.server_lr_min)
        eta, beta = self.eta_s, opt.momentum
        new_w = {k: torch.zeros_like(v) for k, v in w.items()}
        if opt.momentum_mode == "round_start":
            new_m = {k: torch.zeros_like(v) for k, v in w.items()}
            for p_i, cp in zip(p, c_plus):
                for k in w:
                    m_i = beta * self.m[k] + (1 - beta) * g[k] + (self.c[k] - cp[k])
                    new_w[k] += p_i * (w_bar[k] - eta * m_i)
                    new_m[k] += p_i * m_i
            self.m = new_m
        else:
            mu = dict(self.m)
            for p_i, cp in zip(p, c_plus):
                for k in w:
                    mu[k] = beta * mu[k] + (1 - beta) * g[k] + (self.c[k] - cp[k])
                    new_w[k] += p_i * (w_bar[k] - eta * mu[k])
            self.m = mu
        if not opt.decay_before_step:
            self.eta_s = max(opt.server_lr_decay * self.eta_s, opt.server_lr_min)
        commit_client_variates()
        m_norm = sum(float(v.norm() ** 2) for v in self.m.values()) ** 0.5
        cv_norm = sum(float(sum(v.norm() ** 2 for v in cp.values())) ** 0.5 for cp in c_plus) / len(c_plus)
        self.diagnostics = {
            "server/cv_to_momentum_ratio": cv_norm / max(m_norm, 1e-12),
            "server/lr": eta,
            **_step_against_fedavg(w, w_bar, new_w),
        }
        self._watch_drift([u.num_steps for u in updates])
        return new_w

    def _watch_drift(self, steps: Sequence[int]) -> None:
        """Warn once when, two rounds running, the server's correction outweighs FedAvg's step and points against it.

        That is how the ``code`` preset diverges when clients take few local steps: the control-variate term
        ``(w - w_i) / (K_i eta_l)`` grows as ``K_i`` shrinks and, chained through the cohort, is added once per
        sampled client (``benchmarks/results/fedpeptao_drift``, docs/federated.md).
        """
        d = self.diagnostics
        against = d["server/correction_over_fedavg"] > 1.0 and d["server/cos_step_fedavg"] < 0.0
        self._against_rounds = self._against_rounds + 1 if against else 0
        if self._against_rounds == 2 and not self._drift_warned:
            self._drift_warned = True
            # the hint names only what is not set yet: round-start momentum first, then the 1 / (K eta_l) term
            hint = (
                "use `options: {momentum_mode: round_start}` (or the `clean` preset), or more local steps per "
                "round (`local_epochs`)"
                if self.options.momentum_mode == "chained"
                else "give each client more local steps per round (`local_epochs`), or a larger `cv_local_lr` (the "
                f"control-variate term scales as 1 / (K eta_l); now {self.options.cv_local_lr:g})"
            )
            warnings.warn(
                f"FedPepTAOServer: for two rounds the server's correction was "
                f"{d['server/correction_over_fedavg']:.1f}x FedAvg's step and pointed against it (cosine "
                f"{d['server/cos_step_fedavg']:+.2f}), with {sum(steps) / len(steps):.1f} local steps per client and "
                f"{len(steps)} clients a round (`momentum_mode={self.options.momentum_mode!r}`); the global prompt "
                f"is likely to diverge. HINT: {hint}, see docs/federated.md.",
                RuntimeWarning,
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "m": self.m,
            "c": self.c,
            "c_clients": self.c_clients,
            "delta_prev": self.delta_prev,
            "eta_s": self.eta_s,
            "options": asdict(self.options),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.m, self.c, self.delta_prev = state["m"], state["c"], state["delta_prev"]
        self.c_clients = {int(k): v for k, v in state["c_clients"].items()}
        self.eta_s = float(state["eta_s"])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "num_clients": self.num_clients,
            "adaptive_names": self.adaptive_names,
            **asdict(self.options),
        }
