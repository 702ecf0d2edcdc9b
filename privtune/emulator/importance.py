"""ScaleOT's layer-importance scores learned by reinforcement learning (arXiv 2412.09812).

Each candidate layer ``i`` has a real score ``s_i`` (0 at start, ``σ(s_i) = 0.5``). The policy samples which
layers to keep (the others run their harmonizer); the reward of a sampled mask is how well the model does
with it, relative to the other masks of the same step; the update is REINFORCE on the kept layers. ScaleOT
publishes no code: the policy, reward and update below follow the secondary sources in
docs/offsite_tuning.md and are a contextual bandit, not a multi-step MDP.

* **SampleMask**: ``u_i = σ(s_i) · U(0, 1)``; split the candidates into consecutive groups of ``N_g = 4``;
  in each group keep the ``⌈|G| / 2⌉`` layers with the largest ``u_i`` and replace the rest.
* **Reward**: ``r_j = exp(−L_j) − mean_c exp(−L_c)`` over the ``N_c`` masks of one step (``reward="exp"``,
  as published), or the same divided by ``mean_c exp(−L_c)`` (``reward="relative"``): ``exp(−L_j) / mean_c
  exp(−L_c) − 1``, which is about ``mean_c L_c − L_j`` for close losses whatever the loss level. The published
  reward scales with ``exp(−L)``: at a language-model loss of 6 (SmolLM2 on tweets) that is 0.0025, and the scores
  move by about 1e-5 a step, so 100 steps leave them at noise (``benchmarks/results/offsite_loo_importance``:
  scores within ±0.0006, Spearman +0.25 with leave-one-out importance). The relative reward keeps the paper's
  ranking of masks and its update and only removes that scale.
* **Update**: for every mask ``j`` and every layer ``i`` kept in it,
  ``s_i ← s_i + η · r_j · σ(s_i)(1 − σ(s_i))``.

A layer whose replacement hurts the loss is kept in the masks with the high rewards, so its score rises;
the emulator then replaces the layers with the **lowest** scores. Threat model: the scores are the model
owner's; only the emulator they select is shipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Reward = Literal["exp", "relative"]
REWARDS: tuple[str, ...] = ("exp", "relative")


def sample_keep_mask(scores: Tensor, group_size: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """One SampleMask draw: bool ``[n]``, True = keep the original layer, False = run its harmonizer.

    Args:
        scores: ``[n]`` real scores of the candidate layers, in depth order.
        group_size: ``N_g``; each consecutive group keeps ``⌈|G| / 2⌉`` of its layers.
        generator: for reproducible draws.

    Raises:
        ValueError: if ``group_size < 1``.
    """
    if group_size < 1:
        raise ValueError(f"`group_size={group_size}` must be >= 1.")
    u = torch.sigmoid(scores.detach().float()) * torch.rand(scores.shape, generator=generator)
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for start in range(0, scores.numel(), group_size):
        group = u[start : start + group_size]
        top = torch.topk(group, math.ceil(group.numel() / 2)).indices
        keep[start + top] = True
    return keep


def rewards(losses: Sequence[float] | Tensor, reward: Reward = "exp") -> Tensor:
    """The rewards of the ``N_c`` candidate losses of one step.

    ``exp``: ``r_j = exp(−L_j) − mean_c exp(−L_c)`` (ScaleOT). ``relative``: ``exp(−L_j) / mean_c exp(−L_c) − 1``
    (the same, free of the loss level; computed from ``L_j − min_c L_c`` so that it cannot underflow).

    Raises:
        ValueError: for an unknown ``reward``.
    """
    if reward not in REWARDS:
        raise ValueError(f"`reward={reward!r}` must be one of {REWARDS}.")
    loss = torch.as_tensor(losses, dtype=torch.float64)
    if reward == "relative":
        value = torch.exp(-(loss - loss.min()))
        return value / value.mean() - 1.0
    value = torch.exp(-loss)
    return value - value.mean()


def reinforce_update(
    scores: Tensor, keep_masks: Tensor, losses: Sequence[float] | Tensor, lr: float, reward: Reward = "exp"
) -> Tensor:
    """New scores after one RL step (pure; ``scores`` is not modified).

    Args:
        scores: ``[n]`` current scores.
        keep_masks: ``[N_c, n]`` bool, the sampled masks (True = kept).
        losses: ``[N_c]`` loss of the model under each mask, on a held-out batch.
        lr: ``η``.
        reward: ``exp`` (ScaleOT) or ``relative`` (see :func:`rewards`).

    Returns:
        ``[n]`` scores, same dtype as ``scores``.
    """
    r = rewards(losses, reward)  # [N_c]
    sig = torch.sigmoid(scores.double())
    step = (r[:, None] * keep_masks.double()).sum(0) * sig * (1 - sig)  # [n]
    return (scores.double() + lr * step).to(scores.dtype)


def least_important(scores: Tensor, candidates: Sequence[int], alpha: float) -> list[int]:
    """The ``⌈α · |C|⌉`` candidates with the lowest score (ties: the shallower first), sorted by index.

    Args:
        scores: ``[len(candidates)]`` scores aligned with ``candidates``.
        candidates: original block indices ``C`` (the non-adapter blocks).
        alpha: replaced fraction, ``0 <= α < 1``.

    Raises:
        ValueError: if ``alpha`` is outside ``[0, 1)`` or the lengths differ.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"`alpha={alpha}` (replaced fraction) must be in [0, 1).")
    if scores.numel() != len(candidates):
        raise ValueError(f"`scores` has {scores.numel()} entries for {len(candidates)} candidate layers.")
    count = math.ceil(alpha * len(candidates) - 1e-9)
    order = sorted(range(len(candidates)), key=lambda j: (float(scores[j]), j))
    return sorted(candidates[j] for j in order[:count])
