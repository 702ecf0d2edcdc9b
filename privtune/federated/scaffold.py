"""SCAFFOLD (Karimireddy et al., arXiv 1910.06378), option II, over a named dict of tensors.

* Client ``i`` corrects every local gradient by ``c - c_i`` (``y <- y - eta_l (g - c_i + c)`` for SGD). With a
  local AdamW, privtune adds ``c - c_i`` to the gradient before the optimizer step (the spec leaves this open:
  the correction then passes through Adam's normalisation, like any gradient term). :class:`DriftCorrection` is
  the one implementation, used by the round loop (:mod:`privtune.federated.loop`) and by the standalone callback
  ``privtune.callbacks.ScaffoldCorrection``.
* After ``K`` local steps: ``c_i+ = c_i - c + (x - y) / (K eta_l)`` (option II); the client keeps ``c_i+`` and
  uploads ``y`` and ``dc_i = c_i+ - c_i``.
* Server: ``x <- x + eta_g mean_i (y_i - x)`` and ``c <- c + (|S| / N) mean_i dc_i`` (unweighted means, as in the
  paper; ``eta_g = 1``).

SCAFFOLD sends ``c`` down and ``dc_i`` up with the model, doubling the traffic (``bytes_factor = 2``).

Threat model: as FedAvg, plus the server sees each client's control-variate change.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from privtune.federated.aggregate import AggregationError, ClientUpdate, State
from privtune.federated.fedopt import ServerOptimizer

DELTA_C = "delta_c/"


class DriftCorrection:
    """``grad += c - c_i`` over named tensors (SCAFFOLD's client step), for one local round.

    Args:
        c: the server's control variate by name.
        c_i: this client's control variate by name (same names).

    Raises:
        ValueError: if the two have different names.
    """

    def __init__(self, c: Mapping[str, Tensor], c_i: Mapping[str, Tensor]) -> None:
        if set(c) != set(c_i):
            raise ValueError(f"SCAFFOLD: `c` has tensors {sorted(c)} but `c_i` has {sorted(c_i)}.")
        self.c = {k: v.detach().clone() for k, v in c.items()}
        self.c_i = {k: v.detach().clone() for k, v in c_i.items()}

    @torch.no_grad()
    def apply(self, grads: MutableMapping[str, Tensor], params: Mapping[str, Tensor] | None = None) -> None:
        """In place: ``grads[k] += c[k] - c_i[k]`` for every ``k`` in ``grads`` (``params`` is not used).

        Raises:
            KeyError: if a gradient has no control variate.
        """
        for name, g in grads.items():
            if name not in self.c:
                raise KeyError(f"SCAFFOLD: tensor {name!r} has no control variate (they cover {sorted(self.c)}).")
            g += (self.c[name] - self.c_i[name]).to(g)


@torch.no_grad()
def client_control_variate(
    c_i: Mapping[str, Tensor],
    c: Mapping[str, Tensor],
    x: Mapping[str, Tensor],
    y: Mapping[str, Tensor],
    num_steps: int,
    eta_l: float,
) -> State:
    """Option II: ``c_i+ = c_i - c + (x - y) / (K eta_l)``.

    Raises:
        ValueError: if ``num_steps < 1`` or ``eta_l <= 0``.
    """
    if num_steps < 1:
        raise ValueError(f"`num_steps` (K) must be >= 1; got {num_steps}.")
    if eta_l <= 0:
        raise ValueError(f"`eta_l` must be > 0; got {eta_l}.")
    return {k: c_i[k] - c[k] + (x[k] - y[k]) / (num_steps * eta_l) for k in x}


class Scaffold(ServerOptimizer):
    """The SCAFFOLD server: global model step and global control variate ``c``.

    Args:
        num_clients: ``N``, all clients (for the ``|S| / N`` factor); ``None``: the run's client count, set by
            :meth:`bind`.
        eta_g: global step size (1.0 in the paper's experiments).
        eta_l: the local learning rate used in option II (exposed as ``client_lr``); ``None``: the run's client
            learning rate, set by :meth:`bind`.

    Raises:
        ValueError: if ``num_clients < 1`` or a step size is not positive.
    """

    bytes_factor = 2
    per_client_extras = True

    def __init__(self, *, num_clients: int | None = None, eta_g: float = 1.0, eta_l: float | None = None) -> None:
        super().__init__()
        if num_clients is not None and num_clients < 1:
            raise ValueError(f"`num_clients` must be >= 1; got {num_clients}.")
        for name, value in (("eta_g", eta_g), ("eta_l", eta_l)):
            if value is not None and value <= 0:
                raise ValueError(f"`{name}` must be > 0; got {value}.")
        self.num_clients, self.eta_g, self.eta_l = num_clients, eta_g, eta_l
        self.client_lr = eta_l
        self.c: State | None = None

    def bind(self, *, num_clients: int, prompt_names: Sequence[str], client_lr: float) -> None:
        if self.num_clients is not None and self.num_clients != num_clients:
            raise ValueError(
                f"Scaffold was built with `num_clients={self.num_clients}` but the data has {num_clients} clients; "
                "leave `num_clients` unset (the run sets it)."
            )
        self.num_clients = num_clients
        if self.eta_l is None:
            self.eta_l = self.client_lr = client_lr

    def _require_bound(self) -> tuple[int, float]:
        if self.num_clients is None or self.eta_l is None:
            raise ValueError("Scaffold needs `num_clients` and `eta_l`: pass them, or call `bind()` (the run does).")
        return self.num_clients, self.eta_l

    def control_variate(self, like: Mapping[str, Tensor]) -> State:
        """The global ``c`` (zeros shaped like ``like`` before the first round)."""
        if self.c is None:
            self.c = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in like.items()}
        return self.c

    def update(self, global_state: State, averaged: State, updates: Sequence[ClientUpdate]) -> State:
        c = self.control_variate(global_state)
        for u in updates:
            missing = [k for k in global_state if DELTA_C + k not in u.extras]
            if missing:
                raise AggregationError(f"SCAFFOLD update of client {u.client_id} lacks `dc_i` for {missing}.")
        num_clients, _ = self._require_bound()
        m = len(updates)
        new = {k: global_state[k] + self.eta_g * sum(u.state[k] - global_state[k] for u in updates) / m for k in c}
        self.c = {k: c[k] + (m / num_clients) * sum(u.extras[DELTA_C + k] for u in updates) / m for k in c}
        return new

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "c": self.c}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.c = state.get("c")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_clients": self.num_clients, "eta_g": self.eta_g, "eta_l": self.eta_l}
