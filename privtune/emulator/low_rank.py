"""Truncated-SVD compression of linear layers: ScaleOT's Selective Rank Compression (arXiv 2412.09812).

SRC replaces each attention matrix ``W_q, W_k, W_v, W_o`` of the original blocks kept in an emulator by its
rank-``r`` truncated SVD ``U_r Σ_r V_rᵀ`` (training-free, after stage 1); FFN weights stay as they are.
privtune reads ScaleOT's ``β`` as the **kept** fraction of the rank: ``r = round(β · min(d_out, d_in))``,
per matrix (under grouped-query attention SmolLM2's k/v projections are 192 x 576, so their rank is 192).
Threat model: the data owner receives only the top-``r`` spectrum of each compressed matrix.

Storage: two factors ``d_in -> r -> d_out`` (:class:`LowRankLinear`) when that is smaller than the dense
matrix, else a dense ``nn.Linear`` holding the rank-``r`` product. Biases are kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from privtune.emulator.layer_stack import as_linear, get_submodule, linear_weight, set_submodule


class LowRankLinear(nn.Module):
    """``y = (x Aᵀ) Bᵀ + b`` with ``A [r, d_in]`` and ``B [d_out, r]``: a rank-``r`` linear in factored form."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)  # A = Σ_r^{1/2} V_rᵀ
        self.up = nn.Linear(rank, out_features, bias=bias)  # B = U_r Σ_r^{1/2}

    @property
    def weight(self) -> Tensor:
        """The dense ``[d_out, d_in]`` product ``B A`` (for inspection; the forward never forms it)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> Tensor | None:
        """The output bias, as on ``nn.Linear``."""
        return self.up.bias

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` -> ``[..., d_out]``."""
        return self.up(self.down(x))


def rank_from_ratio(beta: float, shape: Sequence[int]) -> int:
    """``r = round(β · min(d_out, d_in))``, at least 1.

    Raises:
        ValueError: if ``beta`` is outside ``(0, 1]``.
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"`beta={beta}` (kept rank fraction) must be in (0, 1].")
    return max(1, round(beta * min(shape)))


def full_rank_matrices(shapes: Mapping[str, Sequence[int]], beta: float) -> dict[str, int]:
    """``{name: rank}`` of the matrices that ``beta`` leaves at full rank (``rank_from_ratio >= min(shape)``).

    A truncated SVD at full rank is the original matrix (to float32 rounding): a compression setting that
    gives it ships the matrix it was meant to hide. ``beta = 1`` keeps every matrix.
    """
    ranks = {name: rank_from_ratio(beta, shape) for name, shape in shapes.items()}
    return {name: rank for name, rank in ranks.items() if rank >= min(shapes[name])}


def full_rank_message(option: str, beta: float, shapes: Mapping[str, Sequence[int]]) -> str | None:
    """One sentence naming what ``option=beta`` keeps at full rank and the values allowed, or ``None``.

    The bound: ``round(β · d) <= d - 1`` for every matrix, i.e. ``β < (d - 0.5) / d`` for the smallest
    ``d = min(shape)``.
    """
    full = full_rank_matrices(shapes, beta)
    if not full:
        return None
    name = next(iter(full))
    shape = tuple(shapes[name])
    smallest = min(min(s) for s in shapes.values())
    return (
        f"`{option}={beta}` keeps full rank {full[name]} of `{name}` {shape[0]}x{shape[1]}"
        f"{f' (and {len(full) - 1} more)' if len(full) > 1 else ''}, i.e. ships the original matrix; "
        f"allowed: {option} < {(smallest - 0.5) / smallest:.4f} for this model (rank below min(shape))"
    )


def truncated_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD factors ``(U [m, r], S [r], Vh [r, n])`` of ``weight [m, n]`` (at least float32 precision).

    Raises:
        ValueError: if ``rank`` is outside ``[1, min(m, n)]``.
    """
    full = min(weight.shape)
    if not 1 <= rank <= full:
        raise ValueError(f"`rank={rank}` must be in [1, {full}] for a matrix of shape {tuple(weight.shape)}.")
    work = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def factored_linear(u: Tensor, s: Tensor, vh: Tensor, bias: Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The layer ``x -> x (U S Vh)ᵀ + b``: factored when ``r (d_in + d_out) < d_in d_out``, else dense."""
    (d_out, rank), d_in = u.shape, vh.shape[1]
    if rank * (d_in + d_out) >= d_in * d_out:
        return as_linear(((u * s) @ vh).to(dtype), None if bias is None else bias.detach())
    layer = LowRankLinear(d_in, d_out, rank, bias=bias is not None).to(device=u.device, dtype=dtype)
    root = s.sqrt()
    with torch.no_grad():
        layer.down.weight.copy_((root[:, None] * vh).to(dtype))
        layer.up.weight.copy_((u * root).to(dtype))
        if bias is not None:
            layer.up.bias.copy_(bias.detach())
    return layer


def compress_linear(module: nn.Module, rank: int) -> nn.Module:
    """A new layer holding the rank-``rank`` truncated SVD of ``module`` (``nn.Linear`` or GPT-2 ``Conv1D``).

    At full rank the result equals the input to float32 tolerance (the identity); at rank ``r`` it keeps
    exactly the top-``r`` singular values. The input module is not modified.

    Raises:
        ValueError: if ``rank`` exceeds the matrix rank bound ``min(d_out, d_in)``.
    """
    weight, bias = linear_weight(module)
    u, s, vh = truncated_svd(weight, rank)
    return factored_linear(u, s, vh, bias, weight.dtype)


def rank_compress_modules(root: nn.Module, paths: Sequence[str], beta: float) -> dict[str, int]:
    """Replace each linear at ``paths`` under ``root`` by its rank-``round(β·min(shape))`` SVD (in place).

    Returns ``{path: rank}``. Validation of every path and of ``beta`` happens before any module changes.

    Raises:
        ValueError: if ``beta`` is outside ``(0, 1]`` or a path does not name a linear layer.
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"`beta={beta}` (kept rank fraction) must be in (0, 1].")
    targets = {}
    for path in paths:
        try:
            weight, _ = linear_weight(get_submodule(root, path))
        except (AttributeError, TypeError) as err:
            raise ValueError(f"`{path}` does not name a linear layer under {type(root).__name__}: {err}") from err
        targets[path] = rank_from_ratio(beta, weight.shape)
    for path, rank in targets.items():
        set_submodule(root, path, compress_linear(get_submodule(root, path), rank))
    return targets
