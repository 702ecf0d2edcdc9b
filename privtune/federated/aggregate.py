"""Weighted averaging of client updates: the FedAvg step every server optimizer starts from.

FedAvg (McMahan et al., arXiv 1602.05629): ``w_bar = sum_i p_i w_i`` with ``p_i = n_i / sum_{j in S} n_j``, the
number of training examples of each sampled client ("num-examples" weighting, as in Flower).

Threat model: the server sees each sampled client's uploaded tensors (here, prompt slices), never its data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

State = dict[str, Tensor]


class AggregationError(ValueError):
    """Client updates that cannot be combined: different tensor names, shapes, or bad weights."""


@dataclass
class ClientUpdate:
    """What one client reports at the end of a round.

    Attributes:
        client_id: the client's index in ``0..N-1``.
        state: the uploaded named tensors (the communicated prompt slices).
        num_examples: ``n_i``, the client's number of training examples (the aggregation weight).
        num_steps: ``K_i``, the local optimizer steps it took this round.
        seconds: local wall-clock time (for the round-time accounting).
        extras: method-specific uploads (SCAFFOLD's control-variate change), counted in the traffic.
    """

    client_id: int
    state: State
    num_examples: int
    num_steps: int = 1
    seconds: float = 0.0
    extras: State = field(default_factory=dict)


def check_compatible(reference: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], start: int = 0) -> None:
    """Raise :class:`AggregationError` naming the first client whose tensor names or shapes differ.

    Args:
        reference: the state the updates must match.
        states: the client states.
        start: index of ``states[0]`` in the caller's list (for the message).
    """
    names = set(reference)
    for idx, state in enumerate(states, start=start):
        if set(state) != names:
            missing, extra = sorted(names - set(state)), sorted(set(state) - names)
            raise AggregationError(
                f"client update {idx} has different tensor names from the reference state: missing {missing}, "
                f"unexpected {extra}."
            )
        for name in names:
            if tuple(state[name].shape) != tuple(reference[name].shape):
                raise AggregationError(
                    f"client update {idx}: tensor {name!r} has shape {tuple(state[name].shape)}, the reference "
                    f"state has {tuple(reference[name].shape)}."
                )


def normalized_weights(num_examples: Sequence[float]) -> Tensor:
    """``p_i = n_i / sum_j n_j`` in float64.

    Raises:
        AggregationError: if a weight is negative or they sum to 0.
    """
    weights = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    if weights.numel() == 0:
        raise AggregationError("cannot aggregate zero client updates.")
    if (weights < 0).any() or float(weights.sum()) <= 0:
        raise AggregationError(f"example counts must be >= 0 with a positive sum; got {list(num_examples)}.")
    return weights / weights.sum()


@torch.no_grad()
def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> State:
    """``sum_i p_i state_i`` per name, in float32 (accumulated in float64), with ``p`` = normalised ``weights``.

    Raises:
        AggregationError: on an empty list, mismatched names/shapes, or bad weights.
    """
    if not states:
        raise AggregationError("cannot aggregate zero client updates.")
    if len(states) != len(weights):
        raise AggregationError(f"got {len(states)} client states but {len(weights)} weights.")
    check_compatible(states[0], states[1:], start=1)
    p = normalized_weights(weights)
    out: State = {}
    for name in states[0]:
        acc = torch.zeros(states[0][name].shape, dtype=torch.float64)
        for p_i, state in zip(p, states):
            acc += p_i * state[name].detach().double().cpu()
        out[name] = acc.float()
    return out


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes to send ``state`` as is (``numel * element_size`` summed)."""
    return sum(t.numel() * t.element_size() for t in state.values())
