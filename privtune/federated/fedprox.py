"""FedProx's client-side proximal term (Li et al., arXiv 1812.06127): the one implementation.

The client loss gains ``(mu / 2) ||w - w_g||^2`` (squared norm, as in the paper; Flower's client example uses the
unsquared norm), i.e. the gradient term ``mu (w - w_g)``, added after backward. The server step is whatever server
optimizer the run uses (FedAvg in the paper). :class:`ProximalTerm` is used by the federated round loop
(:mod:`privtune.federated.loop`, config ``proximal_mu``) and by the standalone callback
``privtune.callbacks.FedProx``.

Threat model: as FedAvg; the term only uses the global state the client already received.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping

import torch
from torch import Tensor


def check_mu(mu: float) -> None:
    """Raise ``ValueError`` if ``mu < 0``."""
    if mu < 0:
        raise ValueError(f"`mu` (FedProx proximal weight) must be >= 0; got {mu}.")


class ProximalTerm:
    """``grad += mu (w - w_g)`` over named tensors, with ``w_g`` (the anchor) fixed at construction.

    Args:
        mu: proximal weight (>= 0; 0 adds nothing).
        anchor: ``w_g`` by name (the global state received at the start of the local round).

    Raises:
        ValueError: if ``mu < 0``.
    """

    def __init__(self, mu: float, anchor: Mapping[str, Tensor]) -> None:
        check_mu(mu)
        self.mu = mu
        self.anchor = {k: v.detach().clone() for k, v in anchor.items()}

    @torch.no_grad()
    def apply(self, grads: MutableMapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
        """In place: ``grads[k] += mu (params[k] - anchor[k])`` for every ``k`` in ``grads``.

        Raises:
            KeyError: if a gradient has no anchor (the caller names the tensors it federates).
        """
        if self.mu <= 0:
            return
        for name, g in grads.items():
            if name not in self.anchor:
                raise KeyError(f"FedProx: tensor {name!r} has no global value (anchor holds {sorted(self.anchor)}).")
            g += self.mu * (params[name].detach() - self.anchor[name].to(g))


@torch.no_grad()
def add_proximal_gradient(params: Iterable[Tensor], global_params: Iterable[Tensor], mu: float) -> None:
    """In place: ``p.grad += mu (p - p_global)`` for every parameter with a gradient (positional form)."""
    check_mu(mu)
    pairs = [(p, g) for p, g in zip(params, global_params) if p.grad is not None]
    term = ProximalTerm(mu, {str(i): g for i, (_, g) in enumerate(pairs)})
    term.apply({str(i): p.grad for i, (p, _) in enumerate(pairs)}, {str(i): p for i, (p, _) in enumerate(pairs)})


def proximal_term(params: Iterable[Tensor], global_params: Iterable[Tensor], mu: float) -> Tensor:
    """``(mu / 2) sum ||p - p_global||^2`` as a differentiable scalar."""
    check_mu(mu)
    terms = [((p - g.to(p)) ** 2).sum() for p, g in zip(params, global_params)]
    return 0.5 * mu * torch.stack(terms).sum() if terms else torch.tensor(0.0)
