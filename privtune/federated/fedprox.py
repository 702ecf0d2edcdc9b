"""FedProx's client-side proximal term (Li et al., arXiv 1812.06127).

The client loss gains ``(mu / 2) ||w - w_g||^2`` (squared norm, as in the paper; Flower's client example uses the
unsquared norm), i.e. the gradient term ``mu (w - w_g)``, added after backward. The server step is FedAvg.

Threat model: as FedAvg; the term only uses the global state the client already received.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def check_mu(mu: float) -> None:
    """Raise ``ValueError`` if ``mu < 0``."""
    if mu < 0:
        raise ValueError(f"`mu` (FedProx proximal weight) must be >= 0; got {mu}.")


@torch.no_grad()
def add_proximal_gradient(params: Iterable[Tensor], global_params: Iterable[Tensor], mu: float) -> None:
    """In place: ``p.grad += mu (p - p_global)`` for every parameter with a gradient."""
    check_mu(mu)
    for p, g in zip(params, global_params):
        if p.grad is not None and mu > 0:
            p.grad.add_(p.detach() - g.to(p), alpha=mu)


def proximal_term(params: Iterable[Tensor], global_params: Iterable[Tensor], mu: float) -> Tensor:
    """``(mu / 2) sum ||p - p_global||^2`` as a differentiable scalar."""
    check_mu(mu)
    terms = [((p - g.to(p)) ** 2).sum() for p, g in zip(params, global_params)]
    return 0.5 * mu * torch.stack(terms).sum() if terms else torch.tensor(0.0)
