"""FedProx's proximal term for a client that trains with an ordinary Lightning ``Trainer``.

FedProx (Li et al., arXiv 1812.06127): the client loss gains ``(mu / 2) ||w - w_g||^2`` over the federated
tensors, i.e. the gradient term ``mu (w - w_g)``, added in ``on_after_backward`` by the core
:class:`privtune.federated.ProximalTerm` (the same implementation the federated round loop applies with
``proximal_mu``). ``w_g`` is the global value the client received: it is taken afresh at the start of every fit,
from :meth:`FedProx.set_global` if it was called for that fit, else from the parameters as they are then. This
callback is for a real client process that runs ``trainer.fit`` once per round; under privtune's federated
Strategies use ``federated.proximal_mu`` instead (the callback is refused there).

Threat model: as FedAvg; the term only uses the global state the client already holds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from privtune.federated.fedprox import ProximalTerm, check_mu


class FedProx(Callback):
    """Add ``mu (w - w_g)`` to the gradients of the parameters whose name starts with ``param_prefix``.

    Args:
        mu: proximal weight (>= 0; 0 is FedAvg).
        param_prefix: names of the federated parameters start with this (``prompt`` for deep prefixes).

    Raises:
        ValueError: if ``mu < 0``; at fit start, if no trainable parameter matches ``param_prefix`` or the tensors
            given to :meth:`set_global` are not the matched ones.
    """

    federated_support: ClassVar[str] = "refuse"
    federated_alternative: ClassVar[str] = (
        "set `strategy.init_args.federated.proximal_mu` (the round loop adds the same term to every client's gradients)"
    )

    def __init__(self, mu: float = 0.01, param_prefix: str = "prompt") -> None:
        check_mu(mu)
        self.mu, self.param_prefix = mu, param_prefix
        self.global_state: dict[str, Tensor] = {}
        self._next_global: dict[str, Tensor] | None = None
        self._term: ProximalTerm | None = None

    def _params(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if n.startswith(self.param_prefix) and p.requires_grad}

    def set_global(self, state: dict[str, Tensor]) -> None:
        """Use ``state`` (name -> tensor) as ``w_g`` for the next fit instead of the values at its start."""
        self._next_global = {k: v.detach().clone() for k, v in state.items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        if not params:
            raise ValueError(
                f"FedProx: no trainable parameter name starts with `param_prefix={self.param_prefix!r}`; set "
                "`param_prefix` to the federated parameters' name prefix (e.g. 'prompt')."
            )
        anchor = self._next_global if self._next_global is not None else {n: p.detach() for n, p in params.items()}
        self._next_global = None
        if set(anchor) != set(params):
            raise ValueError(
                f"FedProx: the global state names {sorted(anchor)} but `param_prefix={self.param_prefix!r}` matches "
                f"{sorted(params)}; give `set_global` exactly the federated parameters."
            )
        self._term = ProximalTerm(self.mu, anchor)
        self.global_state = self._term.anchor

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._term is None:
            return
        params = self._params(pl_module)
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        self._term.apply(grads, params)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._term = None  # the next fit re-anchors

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu, "global_state": self.global_state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a resumed fit continues with the anchor it started with (Lightning loads this before `on_train_start`)
        saved = dict(state_dict.get("global_state", {}))
        self._next_global = saved or None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mu=self.mu, param_prefix=self.param_prefix)


__all__ = ["FedProx"]
