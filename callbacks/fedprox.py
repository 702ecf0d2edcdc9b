"""FedProx's proximal term for a client that trains with an ordinary Lightning ``Trainer``.

FedProx (Li et al., arXiv 1812.06127): the client loss gains ``(mu / 2) ||w - w_g||^2`` over the federated
tensors, i.e. the gradient term ``mu (w - w_g)``, added in ``on_after_backward``. ``w_g`` is the global value the
client received; it is snapshotted at ``on_train_start`` (or set with :meth:`FedProx.set_global`). The federated
Strategy applies the same term itself (``server: fedprox``); this callback is for a real client process that runs
``trainer.fit`` once per round.

Threat model: as FedAvg; the term only uses the global state the client already holds.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from privtune.federated.fedprox import add_proximal_gradient, check_mu


class FedProx(Callback):
    """Add ``mu (w - w_g)`` to the gradients of the parameters whose name starts with ``param_prefix``.

    Args:
        mu: proximal weight (>= 0; 0 is FedAvg).
        param_prefix: names of the federated parameters start with this (``prompt`` for deep prefixes).

    Raises:
        ValueError: if ``mu < 0`` or no trainable parameter matches ``param_prefix`` at fit start.
    """

    def __init__(self, mu: float = 0.01, param_prefix: str = "prompt") -> None:
        check_mu(mu)
        self.mu, self.param_prefix = mu, param_prefix
        self.global_state: dict[str, Tensor] = {}

    def _params(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if n.startswith(self.param_prefix) and p.requires_grad}

    def set_global(self, state: dict[str, Tensor]) -> None:
        """Use ``state`` (name -> tensor) as ``w_g`` instead of the values at train start."""
        self.global_state = {k: v.detach().clone() for k, v in state.items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        if not params:
            raise ValueError(f"FedProx: no trainable parameter name starts with `param_prefix={self.param_prefix!r}`.")
        if not self.global_state:
            self.set_global(params)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        names = [n for n in params if n in self.global_state]
        add_proximal_gradient([params[n] for n in names], [self.global_state[n] for n in names], self.mu)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu, "global_state": self.global_state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.global_state = dict(state_dict.get("global_state", {}))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mu=self.mu, param_prefix=self.param_prefix)


__all__ = ["FedProx"]
