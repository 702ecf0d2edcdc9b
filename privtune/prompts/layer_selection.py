"""Which prompt layers to federate: FedPepTAO's layer score and Hessian-spectrum ratio.

FedPepTAO (Che et al., EMNLP 2023, arXiv 2310.15080) shares only the prefixes of a subset of layers. The subset is
the top ``k`` of a ranking, computed once before training:

* **Layer score** (§4.1 of the spec, official code): for one mini-batch per client, the ``B x B`` cosine
  similarity matrix ``K`` of each layer's flattened sample representations, ``s = sum_j ln(l_j + eps) + 1/(l_j + eps)``
  over its eigenvalues ``l_j`` (NASWOT, arXiv 2006.04647, without its minus sign, as in the code: a high score
  means strongly correlated samples). Scores are averaged over clients with weights ``n_k / sum n``. The last layer
  is never scored (0).
* **How many** (§4.2): the spectral mass of the loss Hessian w.r.t. the prefix above a threshold found by a plateau
  search, estimated by stochastic Lanczos quadrature (PyHessian's recipe, arXiv 1912.07145) from Hessian-vector
  products; ``k = round(r * L)``.

Threat model: scoring runs on each client's own data; only the per-layer scores (``L`` floats) and the ratio leave
a client, never the representations.

Decisions where the spec leaves it open (documented in docs/federated.md):

* "layer-l output" is ``hidden_states[l + 1]`` of a Hugging Face forward (index 0 is the embedding output), so
  layer ``l``'s score describes the output of the block whose prefix is ``prefix[:, l]``.
* ``k = round(r * L)`` with Python's ``round`` (half to even), clamped to ``[1, L]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

EPS = 1e-5


def layer_score(hidden: Tensor, eps: float = EPS) -> float:
    """The FedPepTAO score of one layer's output for one mini-batch.

    Args:
        hidden: ``[B, ...]`` representations of ``B`` samples (flattened over sequence x hidden, padding included).
        eps: added to each eigenvalue.

    Returns:
        ``sum_j ln(l_j + eps) + 1 / (l_j + eps)`` over the eigenvalues of the cosine-similarity matrix, with
        round-off negatives clamped to 0.
    """
    flat = hidden.detach().reshape(hidden.shape[0], -1).double()
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = flat @ flat.T  # [B, B] cosine similarities
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    return float((torch.log(eig + eps) + 1.0 / (eig + eps)).sum())


def client_layer_scores(hidden_states: Sequence[Tensor]) -> Tensor:
    """Scores of every layer for one client's mini-batch.

    Args:
        hidden_states: the model's ``output_hidden_states`` tuple: ``L + 1`` tensors ``[B, T, d]``, index 0 the
            embedding output.

    Returns:
        ``[L]`` float64; entry ``l`` scores ``hidden_states[l + 1]``; the last layer is 0.

    Raises:
        ValueError: if fewer than two hidden-state tensors are given.
    """
    if len(hidden_states) < 2:
        raise ValueError(f"`hidden_states` must hold the embedding output and >= 1 layer; got {len(hidden_states)}.")
    batch = hidden_states[0].shape[0]
    if batch < 2:
        warnings.warn(
            "Layer scoring with a batch of 1 makes every layer's score equal (the 1x1 Gram is always 1); "
            "use B >= 2 (the FedPepTAO code uses 8).",
            stacklevel=2,
        )
    num_layers = len(hidden_states) - 1
    scores = torch.zeros(num_layers, dtype=torch.float64)
    for layer in range(num_layers - 1):  # the last layer is never scored
        scores[layer] = layer_score(hidden_states[layer + 1])
    return scores


def aggregate_layer_scores(scores: Sequence[Tensor], num_examples: Sequence[int]) -> Tensor:
    """Data-size weighted mean ``S = sum_k (n_k / sum n) s_k`` of per-client ``[L]`` scores."""
    if len(scores) != len(num_examples) or not scores:
        raise ValueError(f"need one size per client score; got {len(scores)} scores and {len(num_examples)} sizes.")
    weights = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"`num_examples` must be non-negative with a positive sum; got {list(num_examples)}.")
    weights = weights / weights.sum()
    return (torch.stack([s.double() for s in scores]) * weights[:, None]).sum(0)


def rank_layers(scores: Tensor) -> list[int]:
    """Layers by descending score (ties broken by the lower index, so the ranking is deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return order


def select_layers(ranking: Sequence[int], k: int) -> list[int]:
    """The top ``k`` layers of a ranking.

    Raises:
        ValueError: if ``k`` is not in ``[1, len(ranking)]``.
    """
    if not 1 <= k <= len(ranking):
        raise ValueError(
            f"`num_selected_layers` must be in [1, {len(ranking)}] (the model has {len(ranking)} prompt layers); "
            f"got {k}."
        )
    return list(ranking[:k])


def num_layers_from_ratio(ratio: float, num_layers: int) -> int:
    """``k = round(ratio * L)`` clamped to ``[1, L]``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"`ratio` must be in [0, 1]; got {ratio}.")
    return int(min(num_layers, max(1, round(ratio * num_layers))))


# --- Hessian spectrum ---------------------------------------------------------------------------------------------
def hessian_vector_product(loss_fn: Callable[[], Tensor], param: Tensor, vector: Tensor) -> Tensor:
    """``H v`` of ``loss_fn()`` w.r.t. ``param`` by double backward (Pearlmutter's trick).

    The loss runs with PyTorch's math attention kernel: the fused CPU/CUDA attention kernels have no double
    backward.

    Args:
        loss_fn: recomputes the scalar loss from ``param`` (called once).
        param: a leaf tensor with ``requires_grad``.
        vector: same shape as ``param``.
    """
    with sdpa_kernel([SDPBackend.MATH]):
        loss = loss_fn()
        (grad,) = torch.autograd.grad(loss, param, create_graph=True)
        (hv,) = torch.autograd.grad(grad, param, grad_outputs=vector)
    return hv.detach()


def lanczos(
    matvec: Callable[[Tensor], Tensor], dim: int, num_iters: int = 50, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Lanczos tridiagonalisation from one Rademacher start vector, with full reorthogonalisation.

    Returns:
        ``(ritz_values, weights)``: the eigenvalues ``theta_j`` of the tridiagonal ``T`` and the squared first
        components of its eigenvectors (the SLQ quadrature weights, summing to 1).
    """
    generator = torch.Generator().manual_seed(seed)
    v = (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(dtype)
    v = v / v.norm()
    basis: list[Tensor] = [v]
    alphas: list[float] = []
    betas: list[float] = []
    w = matvec(v).to(dtype)
    alpha = float(w @ v)
    w = w - alpha * v
    alphas.append(alpha)
    for _ in range(1, min(num_iters, dim)):
        beta = float(w.norm())
        if beta < 1e-10:  # invariant subspace found: the spectrum seen from v is exact
            break
        v_next = w / beta
        for b in basis:  # full reorthogonalisation keeps the Ritz values honest in float
            v_next = v_next - (v_next @ b) * b
        v_next = v_next / v_next.norm()
        w = matvec(v_next).to(dtype)
        alpha = float(w @ v_next)
        w = w - alpha * v_next - beta * basis[-1]
        basis.append(v_next)
        alphas.append(alpha)
        betas.append(beta)
    tri = torch.diag(torch.tensor(alphas, dtype=dtype))
    if betas:
        off = torch.tensor(betas, dtype=dtype)
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    ritz, vectors = torch.linalg.eigh(tri)
    return ritz, vectors[0] ** 2


def spectral_density(
    ritz: Tensor, weights: Tensor, num_points: int = 10_000, sigma_scale: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Gaussian-smoothed SLQ density on a grid over ``[min - 0.01, max + 0.01]``, normalised to sum 1.

    ``s^2 = sigma_scale * max(1, max - min)`` as in PyHessian / the FedPepTAO code.
    """
    lo, hi = float(ritz.min()), float(ritz.max())
    grid = torch.linspace(lo - 0.01, hi + 0.01, num_points, dtype=torch.float64)
    var = sigma_scale * max(1.0, hi - lo)
    kernel = torch.exp(-((grid[:, None] - ritz[None, :].double()) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)
    density = kernel @ weights.double()
    return grid, density / density.sum()


def mass_above(grid: Tensor, density: Tensor, threshold: float) -> float:
    """``1 - integral_{-inf}^{t} density``: the spectral mass above ``threshold``."""
    return float(1.0 - density[grid <= threshold].sum())


def plateau_ratio(
    grid: Tensor, density: Tensor, step: float = 0.1, window: int = 4, tol: float = 0.005, max_steps: int = 10_000
) -> float:
    """The plateau search of the FedPepTAO code over the thresholds ``t = 0, step, 2 step, ...``.

    Advances ``t`` until ``window`` consecutive ratios change by less than ``tol`` and returns the plateau ratio;
    if the ratio falls below half of ``ratio(0)`` first, halves ``step`` and restarts from 0.
    """
    base = mass_above(grid, density, 0.0)
    for _ in range(60):  # step halvings
        t, previous, stable = 0.0, base, 0
        for _ in range(max_steps):
            t += step
            current = mass_above(grid, density, t)
            if current < base / 2:
                break
            stable = stable + 1 if abs(current - previous) < tol else 0
            if stable >= window:
                return current
            previous = current
        else:
            return previous
        step /= 2
    return base


def hessian_ratio(
    loss_fn: Callable[[], Tensor], param: Tensor, num_iters: int = 50, seed: int = 0, num_points: int = 10_000
) -> float:
    """The FedPepTAO "pruning rate" of one client: SLQ of the loss Hessian w.r.t. ``param``, then the plateau."""
    shape = param.shape

    def matvec(v: Tensor) -> Tensor:
        return hessian_vector_product(loss_fn, param, v.view(shape).to(param.dtype)).reshape(-1)

    ritz, weights = lanczos(matvec, param.numel(), num_iters=num_iters, seed=seed)
    grid, density = spectral_density(ritz, weights, num_points=num_points)
    return plateau_ratio(grid, density)
