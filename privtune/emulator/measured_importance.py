"""Layer importance measured directly: the owner's LM loss with one block at a time replaced by its harmonizer.

ScaleOT (arXiv 2412.09812) learns which middle blocks to replace with a REINFORCE policy
(:mod:`privtune.emulator.importance`); what that policy estimates is how much the loss rises when a block runs its
harmonizer instead. At the scale privtune runs (SmolLM2-135M, 26 candidate blocks) that quantity is cheap to
measure: one pass over a few held-out batches per block. :func:`measured_importance` measures it with the trained
harmonizers, so that a block whose harmonizer is worse than the block (or than no block at all) gets a high score
and is kept. ``EmulatorExport(importance: measured)`` builds the emulator from these scores instead of the RL
ones (docs/offsite_tuning.md, "Diagnosis").

Threat model: the model owner's own computation on its own corpus; only the emulator it selects is shipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from privtune.emulator.harmonizer import LayerSwitch, install_switches, remove_switches, set_replace_mask
from privtune.emulator.scaleot import lm_loss
from privtune.models import get_blocks


@torch.no_grad()
def corpus_loss(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> float:
    """Token-weighted mean LM loss of ``model`` over ``batches`` (``labels`` -100 on padding)."""
    total, tokens = 0.0, 0
    for batch in batches:
        labels = batch.get("labels")
        n = int((labels[:, 1:] != -100).sum()) if labels is not None else int(batch["input_ids"][:, 1:].numel())
        total += float(lm_loss(model, batch)) * n
        tokens += n
    if tokens == 0:
        raise ValueError("corpus_loss: the batches hold no target token.")
    return total / tokens


@torch.no_grad()
def measured_importance(
    model: nn.Module, harmonizers: Mapping[str, nn.Module], batches: Sequence[Mapping[str, Tensor]]
) -> Tensor:
    """``[n]`` loss increases, one per candidate block in depth order: the LM loss on ``batches`` with that block
    alone running its harmonizer, minus the loss of the unchanged model. Higher = more important (keep it).

    Uses the stage-1 switches if they are still installed in ``model`` (their harmonizers are ``harmonizers``);
    otherwise installs temporary ones and removes them. The model is put in eval mode for the measurement and
    restored; every switch is left running its block.

    Raises:
        ValueError: if ``batches`` is empty or ``harmonizers`` names no block of ``model``.
    """
    if not batches:
        raise ValueError("measured_importance needs at least one held-out batch.")
    blocks = list(get_blocks(model))
    layers = sorted(int(k) for k in harmonizers)
    if not layers or layers[-1] >= len(blocks):
        raise ValueError(
            f"measured_importance: harmonizers for blocks {layers} do not fit a {len(blocks)}-block model."
        )
    installed = {i: b for i, b in enumerate(blocks) if isinstance(b, LayerSwitch)}
    switches = installed or install_switches(model, harmonizers)
    was_training = model.training
    model.eval()
    try:
        set_replace_mask(switches, {})
        base = corpus_loss(model, batches)
        rises = []
        for index in layers:
            set_replace_mask(switches, {index: False})
            rises.append(corpus_loss(model, batches) - base)
        return torch.tensor(rises, dtype=torch.float64)
    finally:
        set_replace_mask(switches, {})
        if not installed:
            remove_switches(model)
        model.train(was_training)
