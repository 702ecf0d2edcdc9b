"""Server optimizers over a named dict of tensors: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad.

Formulas and defaults follow Flower's strategies (flwrlabs/flower), so runs can move to Flower:

* FedAvg (arXiv 1602.05629): ``w <- w_bar``, the example-weighted mean of the uploads.
* FedAvgM (Hsu et al., arXiv 1909.06335): ``pg = w - w_bar``; ``v <- pg`` in the first round, then
  ``v <- beta v + pg``; ``w <- w - eta v``. Flower's defaults ``eta = 1, beta = 0`` equal FedAvg.
* FedOpt family (Reddi et al., arXiv 2003.00295), with ``D = w_bar - w`` (new - old), ``m = v = 0`` initially and
  ``m <- beta_1 m + (1 - beta_1) D``:

  - FedAdagrad: ``v <- v + D^2``; ``w <- w + eta m / (sqrt(v) + tau)`` (``beta_1 = 0``);
  - FedAdam: ``v <- beta_2 v + (1 - beta_2) D^2``; ``eta_t = eta sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` with
    ``t`` the 1-based server round (Flower's offset); ``w <- w + eta_t m / (sqrt(v) + tau)``;
  - FedYogi: ``v <- v - (1 - beta_2) D^2 sign(v - D^2)``; ``w <- w + eta m / (sqrt(v) + tau)``.

Every optimizer overrides one method, ``update(global_state, averaged, updates)``; ``step`` checks the updates,
averages them and counts the round. All maths is float32 under ``no_grad``; the state is a plain dict that goes
into checkpoints.

Threat model: the server sees the sampled clients' prompt uploads; it keeps its optimizer state to itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from privtune.federated.aggregate import ClientUpdate, State, check_compatible, weighted_average


def _clone(state: State) -> State:
    return {k: v.detach().clone().float() for k, v in state.items()}


class ServerOptimizer:
    """Base class: FedAvg. Subclasses override :meth:`update` only.

    Server optimizers are injected into a run by class path (``server: {class_path: privtune.federated.FedAdam,
    init_args: {...}}``); their ``__init__`` signatures are the typed configuration. What only the run knows (the
    number of clients, the names of the prompt tensors) is given by the round loop through :meth:`bind`.

    Attributes:
        client_lr: the local learning rate the strategy recommends (``None``: the client's own choice).
        client_reset_optimizer: whether clients should start every round with a fresh optimizer (``None``: the
            run's default, keep the client's state).
        client_zero_grad: whether clients zero the gradient before each local step (``None``: the run's default).
        bytes_factor: multiplier on the upload/download traffic of the prompt (2 for SCAFFOLD's control variates).
        per_client_extras: clients upload more than the communicated tensors (SCAFFOLD's ``dc_i``), which
            client-level DP does not cover; such a server is refused with ``client_dp``.
    """

    client_lr: float | None = None
    client_reset_optimizer: bool | None = None
    client_zero_grad: bool | None = None
    bytes_factor: int = 1
    per_client_extras: bool = False

    def __init__(self) -> None:
        self.round = 0  # server rounds completed (t after a step is 1-based)

    def bind(self, *, num_clients: int, prompt_names: Sequence[str], client_lr: float) -> None:
        """Give the optimizer what only the run knows (called once by the round loop, before round 1).

        Args:
            num_clients: ``N``, all clients of the run.
            prompt_names: the communicated tensors that are prompt slices (the rest: a classification head).
            client_lr: the learning rate the clients use.

        Raises:
            ValueError: if a value given at construction disagrees with the run's.
        """

    def step(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        """One server round: check, average by example count, apply :meth:`update`; returns the new global state.

        Raises:
            AggregationError: if an update's tensor names or shapes differ from ``global_state``, or none is given.
        """
        check_compatible(global_state, [u.state for u in updates])
        averaged = weighted_average([u.state for u in updates], [u.num_examples for u in updates])
        self.round += 1
        with torch.no_grad():
            return self.update(_clone(global_state), averaged, updates)

    def update(self, global_state: State, averaged: State, updates: Sequence[ClientUpdate]) -> State:
        """Return the new global state from the old one and the example-weighted mean ``averaged``."""
        return averaged

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (round counter and buffers)."""
        return {"round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.round = int(state["round"])

    def describe(self) -> dict[str, Any]:
        """The resolved hyper-parameters, for logs and reports."""
        return {"name": type(self).__name__}


class FedAvg(ServerOptimizer):
    """FedAvg (arXiv 1602.05629): the new global state is the example-weighted mean of the uploads."""


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (arXiv 1909.06335), Flower's formula.

    Args:
        server_learning_rate: ``eta`` (Flower default 1.0).
        server_momentum: ``beta`` (Flower default 0.0, which equals FedAvg).

    Raises:
        ValueError: if ``server_learning_rate <= 0`` or ``server_momentum`` is outside ``[0, 1)``.
    """

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__()
        if server_learning_rate <= 0:
            raise ValueError(f"`server_learning_rate` must be > 0; got {server_learning_rate}.")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"`server_momentum` must be in [0, 1); got {server_momentum}.")
        self.eta, self.beta = server_learning_rate, server_momentum
        self.momentum: State | None = None

    def update(self, global_state: State, averaged: State, updates: Sequence[ClientUpdate]) -> State:
        pseudo = {k: global_state[k] - averaged[k] for k in global_state}  # old - new
        if self.beta > 0:
            if self.momentum is None:
                self.momentum = pseudo
            else:
                self.momentum = {k: self.beta * self.momentum[k] + pseudo[k] for k in pseudo}
            pseudo = self.momentum
        return {k: global_state[k] - self.eta * pseudo[k] for k in global_state}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.momentum = state.get("momentum")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "server_learning_rate": self.eta, "server_momentum": self.beta}


class FedOpt(ServerOptimizer):
    """Shared state and first moment of the FedOpt family (arXiv 2003.00295); subclasses define ``v`` and the step.

    Args:
        eta: server learning rate.
        eta_l: client learning rate the strategy recommends (exposed as ``client_lr``).
        beta_1: first-moment decay.
        beta_2: second-moment decay.
        tau: adaptivity (added to ``sqrt(v)``).

    Raises:
        ValueError: if ``eta``, ``eta_l`` or ``tau`` is not positive, or a ``beta`` is outside ``[0, 1)``.
    """

    def __init__(
        self, *, eta: float = 0.1, eta_l: float = 0.1, beta_1: float = 0.0, beta_2: float = 0.0, tau: float = 1e-3
    ) -> None:
        super().__init__()
        for name, value in (("eta", eta), ("eta_l", eta_l), ("tau", tau)):
            if value <= 0:
                raise ValueError(f"`{name}` must be > 0; got {value}.")
        for name, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1); got {value}.")
        self.eta, self.eta_l, self.beta_1, self.beta_2, self.tau = eta, eta_l, beta_1, beta_2, tau
        self.client_lr = eta_l
        self.m: State | None = None
        self.v: State | None = None

    def update(self, global_state: State, averaged: State, updates: Sequence[ClientUpdate]) -> State:
        delta = {k: averaged[k] - global_state[k] for k in global_state}  # new - old (Flower's sign)
        if self.m is None:
            self.m = {k: torch.zeros_like(d) for k, d in delta.items()}
        if self.v is None:
            self.v = {k: torch.zeros_like(d) for k, d in delta.items()}
        self.m = {k: self.beta_1 * self.m[k] + (1 - self.beta_1) * delta[k] for k in delta}
        self.v = {k: self.second_moment(self.v[k], delta[k]) for k in delta}
        lr = self.learning_rate()
        return {k: global_state[k] + lr * self.m[k] / (self.v[k].sqrt() + self.tau) for k in global_state}

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        """The new ``v`` from the old one and ``D`` (the one line that differs between the family members)."""
        raise NotImplementedError

    def learning_rate(self) -> float:
        """The server step size of this round (``eta``; FedAdam bias-corrects it)."""
        return self.eta

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.m, self.v = state.get("m"), state.get("v")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "eta": self.eta,
            "eta_l": self.eta_l,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "tau": self.tau,
        }


class FedAdagrad(FedOpt):
    """FedAdagrad: ``v <- v + D^2``. Flower defaults ``eta = 0.1, eta_l = 0.1, tau = 1e-3, beta_1 = 0``."""

    def __init__(self, *, eta: float = 0.1, eta_l: float = 0.1, beta_1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=0.0, tau=tau)

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return v + delta * delta


class FedAdam(FedOpt):
    """FedAdam with Flower's bias-corrected step. Defaults ``eta = 0.1, eta_l = 0.1, beta_1 = 0.9, beta_2 = 0.99``."""

    def __init__(
        self, *, eta: float = 0.1, eta_l: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * delta * delta

    def learning_rate(self) -> float:
        t = self.round  # 1-based server round of this step
        return self.eta * (1 - self.beta_2 ** (t + 1)) ** 0.5 / (1 - self.beta_1 ** (t + 1))


class FedYogi(FedOpt):
    """FedYogi. Flower defaults ``eta = 0.01, eta_l = 0.0316, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3``."""

    def __init__(
        self, *, eta: float = 0.01, eta_l: float = 0.0316, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        d2 = delta * delta
        return v - (1 - self.beta_2) * d2 * torch.sign(v - d2)
