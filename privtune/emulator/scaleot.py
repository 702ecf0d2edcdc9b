"""ScaleOT, end to end in plain torch (arXiv 2412.09812): stage-1 training and emulator generation.

Stage 1 (model owner, public text) alternates, per step:

1. **DL step**: sample a keep mask from the importance scores, run the model with the other layers
   replaced by their harmonizers, and take a gradient step on the harmonizers only (original blocks frozen).
2. **RL step** (no gradient): sample ``N_c`` masks, compute each one's LM loss on a held-out batch, and move
   the scores with :func:`~privtune.emulator.importance.reinforce_update`.

Stage 2 generates an emulator from the knobs ``(N_a, α, β)``: the ``⌈α·|C|⌉`` least important middle layers
become their harmonizers, the other middle layers are kept with Selective Rank Compression (rank fraction
``β``) on their attention matrices.

Decisions where the paper is silent (also in docs/offsite_tuning.md, and tested):

* Only the candidate (non-adapter) layers get harmonizers and scores: adapters are never replaced, so for
  a fixed ``N_a`` this is the paper's procedure restricted to the layers that matter.
* ``N_g = 4``, ``N_c = 3``, ``η = 0.1`` by default; harmonizer rank 64 (capped at the hidden size).
* ``α`` is global over the middle (not per group); harmonizers are frozen for the data owner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from privtune.emulator.build import build_emulator, compress_kept_blocks
from privtune.emulator.harmonizer import LayerSwitch, set_replace_mask
from privtune.emulator.importance import REWARDS, Reward, reinforce_update, sample_keep_mask
from privtune.emulator.plan import EmulatorPlan, ReplaceChoice, scaleot_plan


class LayerImportance:
    """Importance scores of the candidate layers, with the policy's random generator (resumable).

    Args:
        layers: original indices of the candidate layers, in depth order.
        group_size: ``N_g``.
        seed: seed of the mask sampler.
        reward: ``exp`` (ScaleOT's reward) or ``relative`` (free of the loss level; see
            :func:`~privtune.emulator.importance.rewards`).
    """

    def __init__(self, layers: Sequence[int], group_size: int = 4, seed: int = 0, reward: Reward = "exp") -> None:
        if group_size < 1:
            raise ValueError(f"`group_size={group_size}` must be >= 1.")
        if reward not in REWARDS:
            raise ValueError(f"`reward={reward!r}` must be one of {REWARDS}.")
        self.layers = [int(i) for i in layers]
        self.group_size = group_size
        self.reward = reward
        self.scores = torch.zeros(len(self.layers), dtype=torch.float64)  # s_i = 0: σ(s_i) = 0.5
        # mt19937 seeded with a small integer gives correlated first draws (e.g. seed 0 picks the same layer of a
        # pair ten times in a row): scramble the seed first.
        digest = hashlib.sha256(f"privtune-layer-importance-{seed}".encode()).hexdigest()
        self.generator = torch.Generator().manual_seed(int(digest[:15], 16))

    def sample(self) -> dict[int, bool]:
        """One SampleMask draw: ``{original index: keep}``."""
        keep = sample_keep_mask(self.scores, self.group_size, self.generator)
        return dict(zip(self.layers, keep.tolist()))

    def update(self, masks: Sequence[Mapping[int, bool]], losses: Sequence[float], lr: float) -> None:
        """REINFORCE update from ``N_c`` sampled masks and their held-out losses."""
        keep = torch.tensor([[bool(m[i]) for i in self.layers] for m in masks])
        self.scores = reinforce_update(self.scores, keep, losses, lr, self.reward)

    def state_dict(self) -> dict[str, Any]:
        """Scores, layers and the sampler's RNG state (for exact resume)."""
        return {
            "layers": list(self.layers),
            "group_size": self.group_size,
            "reward": self.reward,
            "scores": self.scores.clone(),
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        if list(state["layers"]) != self.layers:
            raise ValueError(f"Saved importance layers {state['layers']} differ from {self.layers}.")
        saved_reward = state.get("reward", "exp")
        if saved_reward != self.reward:
            raise ValueError(
                f"Saved importance scores were learned with `reward={saved_reward!r}`, this run uses "
                f"`reward={self.reward!r}`; resume with the same reward or start a new run."
            )
        self.group_size = int(state["group_size"])
        self.scores = state["scores"].clone().to(torch.float64)
        self.generator.set_state(state["rng"])


def lm_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Next-token cross-entropy of a causal LM on an LM batch (``labels`` -100 on padding)."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
    )
    return out.loss


def stage1_step(
    model: nn.Module,
    switches: Mapping[int, LayerSwitch],
    importance: LayerImportance,
    optimizer: torch.optim.Optimizer,
    train_batch: Mapping[str, Tensor],
    val_batch: Mapping[str, Tensor],
    num_candidates: int = 3,
    rl_lr: float = 0.1,
) -> dict[str, Any]:
    """One ScaleOT stage-1 step (DL step on the harmonizers, then the RL step on the scores).

    Returns the DL loss, the candidate losses and the masks, for logging.
    """
    mask = importance.sample()
    set_replace_mask(switches, mask)
    loss = lm_loss(model, train_batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    masks, losses = rl_step(model, switches, importance, val_batch, num_candidates, rl_lr)
    return {"loss": loss.detach(), "mask": mask, "rl_masks": masks, "rl_losses": losses}


@torch.no_grad()
def rl_step(
    model: nn.Module,
    switches: Mapping[int, LayerSwitch],
    importance: LayerImportance,
    val_batch: Mapping[str, Tensor],
    num_candidates: int = 3,
    rl_lr: float = 0.1,
) -> tuple[list[dict[int, bool]], list[float]]:
    """Sample ``N_c`` masks, score each on ``val_batch`` and update ``importance`` (no gradient).

    Raises:
        ValueError: if ``num_candidates < 2`` (a single mask has zero reward).
    """
    if num_candidates < 2:
        raise ValueError(f"`num_candidates={num_candidates}` must be >= 2 (rewards are relative to their mean).")
    masks, losses = [], []
    for _ in range(num_candidates):
        masks.append(importance.sample())
        set_replace_mask(switches, masks[-1])
        losses.append(float(lm_loss(model, val_batch)))
    set_replace_mask(switches, {})
    importance.update(masks, losses, rl_lr)
    return masks, losses


def build_scaleot_emulator(
    model: nn.Module,
    scores: Tensor,
    harmonizers: Mapping[str, nn.Module],
    adapter_layers: int = 4,
    alpha: float = 0.5,
    beta: float = 0.8,
    beta_mlp: float = 1.0,
    harmonizer_rank: int = 64,
    replaced: ReplaceChoice = "importance",
) -> tuple[nn.Module, EmulatorPlan]:
    """The ScaleOT emulator of ``model`` for the knobs ``(N_a, α, β)``.

    Args:
        model: the original model (stage-1 switches, if still installed, are looked through).
        scores: ``[L - N_a]`` importance scores of the middle layers.
        harmonizers: ``{"<original index>": Harmonizer}`` trained in stage 1.
        adapter_layers: ``N_a``.
        alpha: replaced fraction of the middle, in ``[0, 1)``.
        beta: kept rank fraction of the attention matrices of kept layers (SRC), in ``(0, 1]``.
        beta_mlp: kept rank fraction of their MLP matrices; 1.0 as in the paper (see
            :func:`~privtune.emulator.build.compress_kept_blocks`).
        harmonizer_rank: bottleneck width recorded in the plan.
        replaced: ``importance`` (ScaleOT) or ``uniform`` (OT's evenly spaced drop set; ablation (b)), see
            :func:`~privtune.emulator.plan.scaleot_plan`.

    Raises:
        ValueError: on any knob outside its range, before any copy is made.
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"`beta={beta}` (kept rank fraction) must be in (0, 1].")
    if not 0.0 < beta_mlp <= 1.0:
        raise ValueError(f"`beta_mlp={beta_mlp}` (kept rank fraction) must be in (0, 1].")
    from privtune.models import num_blocks

    plan = scaleot_plan(num_blocks(model), adapter_layers, scores, alpha, harmonizer_rank, replaced)
    emulator = build_emulator(model, plan, harmonizers)
    compress_kept_blocks(emulator, plan, beta, beta_mlp)
    return emulator, plan
