"""SCAFFOLD's client-side drift correction for a client that trains with an ordinary Lightning ``Trainer``.

SCAFFOLD (Karimireddy et al., arXiv 1910.06378), option II: every local gradient of the federated tensors gets
``c - c_i`` added before the optimizer step, by the core :class:`privtune.federated.DriftCorrection` (the same
implementation the federated round loop applies with ``server: Scaffold``; with AdamW locally the correction passes
through Adam's normalisation, a choice the spec leaves open and privtune documents). After the round,
:meth:`ScaffoldCorrection.new_control_variate` gives ``c_i+ = c_i - c + (x - y) / (K eta_l)``; the client keeps it
and uploads ``dc_i = c_i+ - c_i`` to the server (:class:`privtune.federated.Scaffold`). Under privtune's federated
Strategies use ``federated.server: {class_path: privtune.federated.Scaffold}`` instead (the callback is refused
there).

Threat model: as FedAvg, plus the server sees each client's control-variate change.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from privtune.federated.scaffold import DriftCorrection, client_control_variate


class ScaffoldCorrection(Callback):
    """Add ``c - c_i`` to the gradients of the parameters whose name starts with ``param_prefix``.

    Args:
        eta_l: the local learning rate used in option II.
        param_prefix: names of the federated parameters start with this.

    Raises:
        ValueError: if ``eta_l <= 0``; at fit start, if no trainable parameter matches ``param_prefix`` or the
            control variates name tensors it does not match.
    """

    federated_support: ClassVar[str] = "refuse"
    federated_alternative: ClassVar[str] = (
        "set `strategy.init_args.federated.server: {class_path: privtune.federated.Scaffold}` (the round loop "
        "applies the same correction to every client)"
    )

    def __init__(self, eta_l: float = 0.04, param_prefix: str = "prompt") -> None:
        if eta_l <= 0:
            raise ValueError(f"`eta_l` must be > 0; got {eta_l}.")
        self.eta_l, self.param_prefix = eta_l, param_prefix
        self.c: dict[str, Tensor] = {}
        self.c_i: dict[str, Tensor] = {}
        self.x: dict[str, Tensor] = {}
        self.steps = 0
        self._resumed = False
        self._correction: DriftCorrection | None = None

    def set_control_variates(self, c: dict[str, Tensor], c_i: dict[str, Tensor]) -> None:
        """The server's ``c`` and this client's ``c_i`` for the coming round."""
        self.c = {k: v.detach().clone() for k, v in c.items()}
        self.c_i = {k: v.detach().clone() for k, v in c_i.items()}

    def _params(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if n.startswith(self.param_prefix) and p.requires_grad}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        if not params:
            raise ValueError(
                f"ScaffoldCorrection: no trainable parameter name starts with `param_prefix={self.param_prefix!r}`, "
                "so no gradient would be corrected; set `param_prefix` to the federated parameters' name prefix "
                "(e.g. 'prompt')."
            )
        unknown = sorted((set(self.c) | set(self.c_i)) - set(params))
        if unknown:
            raise ValueError(
                f"ScaffoldCorrection: the control variates name {unknown}, which `param_prefix="
                f"{self.param_prefix!r}` does not match (it matches {sorted(params)}); key `c` and `c_i` by those "
                "parameter names."
            )
        if not self._resumed:  # a fresh round starts from the current parameters; a resumed one keeps x and K
            self.x = {n: p.detach().clone() for n, p in params.items()}
            self.steps = 0
        self._resumed = False
        for n, p in params.items():
            self.c.setdefault(n, torch.zeros_like(p))
            self.c_i.setdefault(n, torch.zeros_like(p))
        self._correction = DriftCorrection(self.c, self.c_i)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._correction is None:
            return
        grads = {n: p.grad for n, p in self._params(pl_module).items() if p.grad is not None}
        self._correction.apply(grads)
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
        self._resumed = bool(self.x)
