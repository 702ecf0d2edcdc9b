"""SCAFFOLD's client-side drift correction for a client that trains with an ordinary Lightning ``Trainer``.

SCAFFOLD (Karimireddy et al., arXiv 1910.06378), option II: every local gradient of the federated tensors gets
``c - c_i`` added before the optimizer step (with AdamW locally the correction passes through Adam's
normalisation; the spec leaves this choice open and privtune documents it). After the round,
:meth:`ScaffoldCorrection.new_control_variate` gives ``c_i+ = c_i - c + (x - y) / (K eta_l)``; the client keeps it
and uploads ``dc_i = c_i+ - c_i`` to the server (:class:`privtune.federated.Scaffold`).

Threat model: as FedAvg, plus the server sees each client's control-variate change.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from privtune.federated.scaffold import client_control_variate


class ScaffoldCorrection(Callback):
    """Add ``c - c_i`` to the gradients of the parameters whose name starts with ``param_prefix``.

    Args:
        eta_l: the local learning rate used in option II.
        param_prefix: names of the federated parameters start with this.

    Raises:
        ValueError: if ``eta_l <= 0``.
    """

    def __init__(self, eta_l: float = 0.04, param_prefix: str = "prompt") -> None:
        if eta_l <= 0:
            raise ValueError(f"`eta_l` must be > 0; got {eta_l}.")
        self.eta_l, self.param_prefix = eta_l, param_prefix
        self.c: dict[str, Tensor] = {}
        self.c_i: dict[str, Tensor] = {}
        self.x: dict[str, Tensor] = {}
        self.steps = 0

    def set_control_variates(self, c: dict[str, Tensor], c_i: dict[str, Tensor]) -> None:
        """The server's ``c`` and this client's ``c_i`` for the coming round."""
        self.c = {k: v.detach().clone() for k, v in c.items()}
        self.c_i = {k: v.detach().clone() for k, v in c_i.items()}

    def _params(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if n.startswith(self.param_prefix) and p.requires_grad}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        self.x = {n: p.detach().clone() for n, p in params.items()}
        self.steps = 0
        for n, p in params.items():
            self.c.setdefault(n, torch.zeros_like(p))
            self.c_i.setdefault(n, torch.zeros_like(p))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        with torch.no_grad():
            for n, p in self._params(pl_module).items():
                if p.grad is not None:
                    p.grad.add_(self.c[n] - self.c_i[n])
        self.steps += 1

    def new_control_variate(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """``c_i+`` after the round's ``K`` steps (option II)."""
        y = {n: p.detach() for n, p in self._params(pl_module).items()}
        return client_control_variate(self.c_i, self.c, self.x, y, max(self.steps, 1), self.eta_l)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c, "c_i": self.c_i, "x": self.x, "steps": self.steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.c, self.c_i = dict(state_dict.get("c", {})), dict(state_dict.get("c_i", {}))
        self.x, self.steps = dict(state_dict.get("x", {})), int(state_dict.get("steps", 0))
