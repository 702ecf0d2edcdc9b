"""Vertical shaking operators: keyed row transforms of an embedding table, each with ``apply`` and ``invert``.

CypherTalk (Chen et al., *A Framework for Cost-Effective and Self-Adaptive LLM Shaking and Recovery
Mechanism*, arXiv 2403.07283) shakes the representation layer with a chain of vertical operators
``addv, inflate, tilt, dx-fixp, gaussian, laplace``. The paper names the operators; the formulas and default
scales below are a reconstruction (spec ``cyphertalk.md`` §2.1), each a config option:

===========  ===============================================  =============  ==================================
operator     row formula ``e -> e'``                           default        inverse (key holder)
===========  ===============================================  =============  ==================================
``addv``     ``e + v``, one ``v ~ N(0, (kappa s_E)^2 I)``      kappa = 1.0    ``e' - v``
``inflate``  ``e * (1 + delta)``, ``delta_j ~ U(-a, a)``       a = 0.2        ``e' / (1 + delta)``
``tilt``     ``e (I + epsilon R)``, ``R_ij ~ N(0, 1/d)``      epsilon = 0.1  ``e' (I + epsilon R)^-1``
``dx-fixp``  ``e + r_t u_t``, ``r_t ~ Gamma(d, eta)``          kappa = 0.5    ``e' - z_t`` (z regenerated)
``gaussian`` ``e + z_t``, ``z_t ~ N(0, (kappa s_E)^2 I)``      kappa = 0.5    ``e' - z_t``
``laplace``  ``e + z_t``, ``z_t ~ Laplace(0, kappa s_E/√2)``   kappa = 0.5    ``e' - z_t``
===========  ===============================================  =============  ==================================

``s_E`` is the std of all entries of the original table and ``n_E`` its mean row norm, so scales transfer
across models; for ``dx-fixp`` the metric-privacy parameter is ``eta = d / (kappa n_E)`` (Feyisetan et al.,
arXiv 1910.08902), so the mean noise norm is ``kappa n_E``. Noise is drawn **once per vocabulary row** and
kept (``noise_mode="fixed"``): the cloud embeds token ids itself, so the noise must live in the table, and
it is exactly invertible by the key holder.

Threat model: the operators hide the table rows from an honest-but-curious cloud that holds the public
original table; they give **no formal differential-privacy guarantee** (the noise is fixed per token).
Their empirical strength is measured by :mod:`privtune.attacks.embedding_inversion`.

All arithmetic runs in float64 and is cast back, so ``invert(apply(E)) == E`` within relative 1e-5 in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

ShakeOp = Literal["addv", "inflate", "tilt", "dx-fixp", "gaussian", "laplace"]

#: tilt keys whose matrix ``I + epsilon R`` has a larger condition number are rejected and redrawn
TILT_MAX_CONDITION = 1e3


@dataclass(frozen=True)
class TableStats:
    """Scale statistics of the original table that operator scales are relative to.

    Attributes:
        std: ``s_E``, the std over all entries of ``E``.
        mean_row_norm: ``n_E``, the mean L2 norm of the rows of ``E``.
    """

    std: float
    mean_row_norm: float

    @classmethod
    def of(cls, table: Tensor) -> TableStats:
        """Statistics of ``table`` ``[V, d]`` (computed in float64)."""
        t = table.detach().double()
        return cls(std=float(t.std()), mean_row_norm=float(t.norm(dim=1).mean()))


class Operator:
    """One vertical operator: a keyed, row-wise transform of a ``[V, d]`` table.

    Subclasses set ``name``, ``params`` (scalar parameter names with their defaults) and implement
    :meth:`draw` (the key tensors, from a seeded generator), :meth:`apply` and :meth:`invert`.
    """

    name: ClassVar[str]
    #: scalar parameters and their defaults
    params: ClassVar[dict[str, float]]
    #: whether the key holder can undo the operator exactly (all are, with fixed noise)
    invertible: ClassVar[bool] = True

    @classmethod
    def validate(cls, params: dict[str, float]) -> dict[str, float]:
        """Fill defaults and check ranges; returns the full parameter dict.

        Raises:
            ValueError: for an unknown parameter name or a value out of range.
        """
        unknown = sorted(set(params) - set(cls.params))
        if unknown:
            raise ValueError(
                f"Unknown parameter(s) {unknown} for shaking operator `{cls.name}`; allowed: {sorted(cls.params)}."
            )
        full = {**cls.params, **{k: float(v) for k, v in params.items()}}
        for key, value in full.items():
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"`{cls.name}.{key}={value}` must be a finite number > 0 (a noise scale <= 0 hides nothing)."
                )
        return full

    @classmethod
    def draw(cls, gen: torch.Generator, shape: tuple[int, int], stats: TableStats, params: dict[str, float]) -> Tensor:
        """The key tensor for a table of ``shape`` ``(V, d)``, drawn from ``gen`` (float64)."""
        raise NotImplementedError

    @classmethod
    def apply(cls, table: Tensor, state: Tensor) -> Tensor:
        """``V``-row transform of ``table`` ``[V, d]`` (float64 in, float64 out)."""
        raise NotImplementedError

    @classmethod
    def invert(cls, table: Tensor, state: Tensor) -> Tensor:
        """Exact inverse of :meth:`apply` for the same ``state``."""
        raise NotImplementedError


class _Additive(Operator):
    """An operator that adds its drawn state to the table and subtracts it to invert."""

    @classmethod
    def apply(cls, table, state):  # noqa: D102
        return table + state

    @classmethod
    def invert(cls, table, state):  # noqa: D102
        return table - state


class AddV(_Additive):
    """``addv``: add one random vector ``v`` to every row (a shared shift)."""

    name = "addv"
    params: ClassVar[dict[str, float]] = {"kappa": 1.0}

    @classmethod
    def draw(cls, gen, shape, stats, params):  # noqa: D102
        return torch.randn(shape[1], generator=gen, dtype=torch.float64) * (params["kappa"] * stats.std)  # [d]


class Inflate(Operator):
    """``inflate``: scale each coordinate by ``1 + delta_j`` (an inflated diagonal), ``0 < a < 1``."""

    name = "inflate"
    params: ClassVar[dict[str, float]] = {"a": 0.2}

    @classmethod
    def validate(cls, params):  # noqa: D102
        full = super().validate(params)
        if full["a"] >= 1:
            raise ValueError(f"`inflate.a={full['a']}` must be in (0, 1) so that 1 + delta never reaches 0.")
        return full

    @classmethod
    def draw(cls, gen, shape, stats, params):  # noqa: D102
        u = torch.rand(shape[1], generator=gen, dtype=torch.float64)
        return 1.0 + (2.0 * u - 1.0) * params["a"]  # [d] factors 1 + delta

    @classmethod
    def apply(cls, table, state):  # noqa: D102
        return table * state

    @classmethod
    def invert(cls, table, state):  # noqa: D102
        return table / state


class Tilt(Operator):
    """``tilt``: right-multiply every row by ``A = I + epsilon R``; keys with ``cond(A) > 1e3`` are redrawn."""

    name = "tilt"
    params: ClassVar[dict[str, float]] = {"epsilon": 0.1}

    @classmethod
    def draw(cls, gen, shape, stats, params):  # noqa: D102
        d = shape[1]
        for _ in range(100):
            r = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
            a = torch.eye(d, dtype=torch.float64) + params["epsilon"] * r  # [d, d]
            if float(torch.linalg.cond(a)) <= TILT_MAX_CONDITION:
                return a
        raise ValueError(
            f"`tilt.epsilon={params['epsilon']}` gives ill-conditioned tilts (condition number > "
            f"{TILT_MAX_CONDITION:g} in 100 draws); use a smaller epsilon (default 0.1)."
        )

    @classmethod
    def apply(cls, table, state):  # noqa: D102
        return table @ state

    @classmethod
    def invert(cls, table, state):  # noqa: D102
        # e = e' A^-1  <=>  A^T e^T = e'^T
        return torch.linalg.solve(state.T, table.T).T


class _RowNoise(_Additive):
    """Additive noise ``z_t`` drawn once per vocabulary row (fixed perturbation) and subtracted to invert."""

    params: ClassVar[dict[str, float]] = {"kappa": 0.5}


class Gaussian(_RowNoise):
    """``gaussian``: ``z_t ~ N(0, (kappa s_E)^2 I_d)`` per token."""

    name = "gaussian"

    @classmethod
    def draw(cls, gen, shape, stats, params):  # noqa: D102
        return torch.randn(shape, generator=gen, dtype=torch.float64) * (params["kappa"] * stats.std)


class Laplace(_RowNoise):
    """``laplace``: ``z_t ~ Laplace(0, kappa s_E / sqrt(2))^d`` per token (same variance as ``gaussian``)."""

    name = "laplace"

    @classmethod
    def draw(cls, gen, shape, stats, params):  # noqa: D102
        b = params["kappa"] * stats.std / math.sqrt(2.0)
        u = torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5  # U(-1/2, 1/2)
        return -b * torch.sign(u) * torch.log1p(-2.0 * u.abs().clamp(max=0.5 - 1e-12))


class DxFixp(_RowNoise):
    """``dx-fixp``: d-chi noise ``r_t u_t`` with ``u_t`` uniform on the sphere and ``r_t ~ Gamma(d, eta)``.

    ``eta = d / (kappa n_E)``. The Gamma radius of integer shape ``d`` is drawn exactly as a sum of ``d``
    Exponential(1) variables divided by ``eta`` (``torch`` has no seeded Gamma sampler).
    """

    name = "dx-fixp"

    @classmethod
    def draw(cls, gen, shape, stats, params):  # noqa: D102
        v, d = shape
        eta = d / (params["kappa"] * stats.mean_row_norm)
        direction = torch.randn(shape, generator=gen, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-30)  # [V, d] on S^{d-1}
        radius = torch.empty(v, dtype=torch.float64)
        for start in range(0, v, 4096):  # chunks keep the [chunk, d] exponential draws small
            stop = min(v, start + 4096)
            u = torch.rand(stop - start, d, generator=gen, dtype=torch.float64)
            radius[start:stop] = -torch.log1p(-u).sum(dim=1) / eta  # Gamma(d, rate eta)
        return direction * radius[:, None]


_OPERATORS: dict[str, type[Operator]] = {op.name: op for op in (AddV, Inflate, Tilt, DxFixp, Gaussian, Laplace)}


def operator_names() -> list[str]:
    """Names of the registered operators."""
    return list(_OPERATORS)


def get_operator(name: str) -> type[Operator]:
    """The operator class registered under ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the registered ones).
    """
    if name not in _OPERATORS:
        raise ValueError(f"Unknown shaking operator {name!r}; allowed: {', '.join(_OPERATORS)}.")
    return _OPERATORS[name]


def register_operator(op: type[Operator]) -> None:
    """Register a custom operator class under ``op.name``.

    Raises:
        ValueError: if the name is taken or ``op`` is not an :class:`Operator` subclass.
    """
    if not (isinstance(op, type) and issubclass(op, Operator)):
        raise ValueError(f"`op={op!r}` must be an Operator subclass (pass the class, not an instance).")
    if op.name in _OPERATORS:
        raise ValueError(f"A shaking operator named {op.name!r} is already registered.")
    _OPERATORS[op.name] = op
