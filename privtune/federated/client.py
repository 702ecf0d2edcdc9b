"""Client side of federated prompt tuning: compact per-client state and the local update.

FedPepTAO's device step (Che et al., arXiv 2310.15080, spec §6): the client starts from its own full local prefix
with the selected layers overwritten by the global value, runs ``E`` epochs (or ``K`` steps) of AdamW on its own
data with gradient clipping, keeps the whole prefix (unselected layers stay personalised) and its AdamW state, and
uploads only the selected slices with ``K_i`` and ``n_i``.

Per client only the prompt tensor, the optimizer's moment tensors and (SCAFFOLD) a control variate are kept, so
100 simulated clients of SmolLM2 (57,600 prefix elements each) fit in a few tens of MB.

Threat model: the client's data and its unselected prefix layers never leave it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from privtune.federated.aggregate import State

ClientOptimizer = Literal["adamw", "sgd"]


@dataclass
class LocalConfig:
    """Local optimisation (FedPepTAO code defaults: AdamW lr 4e-2, wd 0.1, betas (0.9, 0.999), clip 1.0).

    Attributes:
        optimizer: ``adamw`` or ``sgd`` (plain SGD, for exactness checks).
        lr: local learning rate.
        weight_decay: decoupled weight decay (AdamW).
        betas: AdamW betas.
        eps: AdamW eps.
        clip_norm: max gradient 2-norm (``0`` disables clipping).
        local_epochs: passes over the client's data per round.
        max_steps: cap on local steps per round (``0``: no cap).
        zero_grad: zero the gradient before each step (``False`` reproduces the accumulating decoder loops).
        reset_optimizer: a fresh optimizer every round instead of the client's saved state.

    Raises:
        ValueError: on out-of-range values.
    """

    optimizer: ClientOptimizer = "adamw"
    lr: float = 0.04
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float = 1.0
    local_epochs: int = 1
    max_steps: int = 0
    zero_grad: bool = True
    reset_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"`optimizer` must be one of ('adamw', 'sgd'); got {self.optimizer!r}.")
        if self.lr <= 0:
            raise ValueError(f"`lr` must be > 0; got {self.lr}.")
        if self.local_epochs < 1:
            raise ValueError(f"`local_epochs` must be >= 1; got {self.local_epochs}.")
        if self.max_steps < 0 or self.clip_norm < 0 or self.weight_decay < 0:
            raise ValueError("`max_steps`, `clip_norm` and `weight_decay` must be >= 0.")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


@dataclass
class ClientState:
    """What a simulated client keeps between rounds.

    Attributes:
        prompt: the full local prefix ``[P, L, 2, H_kv]`` (its unselected layers are personal); ``None`` for a client
            whose tensors are all communicated.
        optimizer: the local optimizer's ``state_dict`` (``None`` before the first step).
        control_variate: SCAFFOLD's ``c_i`` (``None`` = zeros).
        rounds: rounds this client has trained.
    """

    prompt: Tensor | None
    optimizer: dict[str, Any] | None = None
    control_variate: State | None = None
    rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Checkpointable form."""
        return {
            "prompt": self.prompt,
            "optimizer": self.optimizer,
            "control_variate": self.control_variate,
            "rounds": self.rounds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientState:
        """Inverse of :meth:`to_dict`."""
        return cls(**dict(data))


@dataclass
class ClientStore:
    """All clients' states, created lazily from the common initial prefix at first participation."""

    initial_prompt: Tensor | None
    clients: dict[int, ClientState] = field(default_factory=dict)

    def get(self, client_id: int) -> ClientState:
        """The client's state (a fresh one holding the initial prefix if it never trained)."""
        if client_id not in self.clients:
            return ClientState(prompt=None if self.initial_prompt is None else self.initial_prompt.clone())
        return self.clients[client_id]

    def put(self, client_id: int, state: ClientState) -> None:
        """Store a client's state after its round."""
        self.clients[client_id] = state

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable form."""
        return {"initial_prompt": self.initial_prompt, "clients": {k: v.to_dict() for k, v in self.clients.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.initial_prompt = state["initial_prompt"]
        self.clients = {int(k): ClientState.from_dict(v) for k, v in state["clients"].items()}

    def nbytes(self) -> int:
        """Bytes held by all client states (prompts, optimizer moments, control variates)."""
        total = 0
        for c in self.clients.values():
            if c.prompt is not None:
                total += c.prompt.numel() * c.prompt.element_size()
            if c.optimizer is not None:
                for s in c.optimizer.get("state", {}).values():
                    total += sum(t.numel() * t.element_size() for t in s.values() if torch.is_tensor(t))
            if c.control_variate is not None:
                total += sum(t.numel() * t.element_size() for t in c.control_variate.values())
        return total


def make_optimizer(params: Sequence[Tensor], config: LocalConfig) -> torch.optim.Optimizer:
    """The local optimizer over the client's trainable tensors (the prefix, and an encoder's head)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(list(params), lr=config.lr)
    return torch.optim.AdamW(
        list(params), lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps
    )


def local_update(
    params: Tensor | Sequence[Tensor],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], Tensor],
    config: LocalConfig,
    optimizer_state: dict[str, Any] | None = None,
    grad_hook: Callable[[list[Tensor]], None] | None = None,
    max_steps: int | None = None,
    post_step: Callable[[list[Tensor]], None] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run the local steps on ``param`` in place.

    Args:
        params: the trainable leaves (the prefix first), already holding the client's starting values.
        batches: one epoch of the client's batches (iterated ``local_epochs`` times; must be re-iterable).
        loss_fn: batch -> scalar loss (uses ``param`` through the model).
        config: the local optimisation settings.
        optimizer_state: the client's saved optimizer state (ignored when ``config.reset_optimizer``).
        grad_hook: called with ``params`` after backward and before clipping (FedProx, SCAFFOLD corrections).
        max_steps: overrides ``config.max_steps`` (stragglers run fewer steps).
        post_step: called with ``params`` after every optimizer step (restores frozen slices).

    Returns:
        ``(K_i, optimizer_state)``: steps taken and the optimizer's new state.
    """
    params = [params] if isinstance(params, Tensor) else list(params)
    optimizer = make_optimizer(params, config)
    if optimizer_state is not None and not config.reset_optimizer:
        optimizer.load_state_dict(optimizer_state)
    cap = config.max_steps if max_steps is None else max_steps
    steps = 0
    for p in params:
        p.grad = None
    for _ in range(config.local_epochs):
        for batch in batches:
            if cap and steps >= cap:
                break
            if config.zero_grad:
                for p in params:
                    p.grad = None
            loss = loss_fn(batch)
            loss.backward()
            if grad_hook is not None:
                grad_hook(params)
            if config.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            optimizer.step()
            if post_step is not None:
                post_step(params)
            steps += 1
    for p in params:
        p.grad = None
    return steps, optimizer.state_dict()
