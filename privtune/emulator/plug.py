"""Adapters out of the emulator, into the full model (Offsite-Tuning plug-in, arXiv 2302.04870).

The data owner returns only the adapter blocks. The model owner overwrites blocks ``[0, l) ∪ [L - r, L)``
of the original model with them; nothing else changes. Keys are ``"<original block index>.<parameter
name>"``: state is mapped by block index and parameter name, never by position in a list, so an emulator
whose layers were renumbered still plugs back at the right depth. Threat model: the adapter state is all
that crosses back from the data owner; it holds no training example.

PEFT inside the adapter blocks is merged into the block weights before extraction (the data owner does
that), so plug-in never needs peft.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from privtune.emulator.plan import EmulatorPlan
from privtune.models import get_blocks, unwrap


def extract_adapters(emulator: nn.Module, plan: EmulatorPlan) -> dict[str, Tensor]:
    """``{"<original index>.<param>": tensor}`` for every adapter block of ``emulator`` (detached clones)."""
    blocks = get_blocks(unwrap(emulator))
    if len(blocks) != plan.depth:
        raise ValueError(f"The emulator has {len(blocks)} blocks but its plan describes {plan.depth}.")
    out: dict[str, Tensor] = {}
    for pos, orig in plan.adapter_positions.items():
        for name, tensor in blocks[pos].state_dict().items():
            out[f"{orig}.{name}"] = tensor.detach().clone()
    return out


def plug_adapters(model: nn.Module, adapters: Mapping[str, Tensor], plan: EmulatorPlan) -> nn.Module:
    """Overwrite the adapter blocks of the original ``model`` with ``adapters`` (in place) and return it.

    Every key is checked before any weight changes: each adapter block must receive exactly its full set
    of parameters, with matching shapes.

    Raises:
        ValueError: if the model depth differs from the plan, or keys or shapes do not match.
    """
    blocks = get_blocks(unwrap(model))
    if len(blocks) != plan.num_layers:
        raise ValueError(f"The adapters are for a {plan.num_layers}-block model; this model has {len(blocks)}.")
    per_block: dict[int, dict[str, Tensor]] = {i: {} for i in plan.split.adapter_indices}
    for key, tensor in adapters.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or int(idx) not in per_block:
            raise ValueError(f"Adapter key `{key}` names no adapter block; allowed blocks {sorted(per_block)}.")
        per_block[int(idx)][name] = tensor
    problems = []
    for idx, state in per_block.items():
        expected = blocks[idx].state_dict()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            problems.append(f"block {idx}: missing {missing}, unexpected {extra}")
            continue
        shapes = [n for n, t in state.items() if t.shape != expected[n].shape]
        if shapes:
            problems.append(f"block {idx}: shape mismatch for {shapes}")
    if problems:
        raise ValueError("Cannot plug the adapters in: " + "; ".join(problems) + ".")
    with torch.no_grad():
        for idx, state in per_block.items():
            blocks[idx].load_state_dict(state, strict=True)
    return model
