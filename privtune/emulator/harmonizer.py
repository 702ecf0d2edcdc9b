"""ScaleOT harmonizers and Dynamic LayerReplace (arXiv 2412.09812).

A **harmonizer** is a lightweight network that stands in for one transformer block and keeps the hidden
size, so the blocks around it keep their depth positions. ScaleOT gives no code; privtune uses a residual
low-rank FFN (decision, documented in docs/offsite_tuning.md)::

    h  ->  h + W_up · ReLU(W_down · h)        W_down: d -> rank,  W_up: rank -> d,  W_up = 0 at init

so a fresh harmonizer is exactly the identity, i.e. plain layer drop, and training only has to learn the
correction. It accepts (and ignores) every argument a decoder/encoder block of the installed transformers
version takes, and returns a tensor as those blocks do. Threat model: the harmonizer is what the data
owner receives instead of the block it replaces; it holds ``2 · d · rank`` trained numbers and none of
the block's weights.

**Dynamic LayerReplace** trains all harmonizers while the blocks they stand for are swapped in and out:
:class:`LayerSwitch` wraps (block, harmonizer) at one depth position, and :func:`set_replace_mask` picks
which positions currently run their harmonizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from privtune.models import get_blocks, set_blocks


class Harmonizer(nn.Module):
    """Residual low-rank FFN that replaces one block: ``h + up(relu(down(h)))``.

    Args:
        hidden_size: ``d``, the model's hidden size.
        rank: bottleneck width (ScaleOT's secondary sources use 64).

    Raises:
        ValueError: if ``hidden_size`` or ``rank`` is not positive.
    """

    def __init__(self, hidden_size: int, rank: int = 64) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"`hidden_size={hidden_size}` must be >= 1.")
        if rank < 1:
            raise ValueError(f"`harmonizer_rank={rank}` must be >= 1.")
        self.down = nn.Linear(hidden_size, rank)
        self.up = nn.Linear(rank, hidden_size)
        nn.init.zeros_(self.up.weight)  # identity at init: a fresh harmonizer is layer drop
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object) -> Tensor:
        """``hidden_states [B, T, d]`` -> ``[B, T, d]``; the block's other arguments are ignored."""
        return hidden_states + self.up(torch.relu(self.down(hidden_states)))


class LayerSwitch(nn.Module):
    """One depth position that runs either its original block or its harmonizer.

    The original block stays registered (its parameters frozen by the caller), so the switch can be flipped
    every step without rebuilding the model.
    """

    def __init__(self, block: nn.Module, harmonizer: Harmonizer) -> None:
        super().__init__()
        self.block = block
        self.harmonizer = harmonizer
        self.replaced = False

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object) -> Tensor:
        """Run the harmonizer when replaced, else the block with all its arguments."""
        if self.replaced:
            return self.harmonizer(hidden_states)
        return self.block(hidden_states, *args, **kwargs)


def make_harmonizers(hidden_size: int, layers: Sequence[int], rank: int = 64, seed: int = 0) -> nn.ModuleDict:
    """One fresh :class:`Harmonizer` per original block index, keyed ``"<index>"`` (seeded, reproducible)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.ModuleDict({str(i): Harmonizer(hidden_size, rank) for i in layers})
    finally:
        torch.random.set_rng_state(generator_state)


def install_switches(model: nn.Module, harmonizers: Mapping[str, nn.Module]) -> dict[int, LayerSwitch]:
    """Wrap each block whose index is a key of ``harmonizers`` in a :class:`LayerSwitch` (in place).

    The switches share the given harmonizer modules (no copy), so an optimizer over ``harmonizers`` trains
    what the model runs. Returns ``{block index: switch}``.
    """
    blocks = list(get_blocks(model))
    switches: dict[int, LayerSwitch] = {}
    for key, harmonizer in harmonizers.items():
        idx = int(key)
        if not 0 <= idx < len(blocks):
            raise ValueError(f"Harmonizer key `{key}` is not a block index of a model with {len(blocks)} blocks.")
        if isinstance(blocks[idx], LayerSwitch):
            raise ValueError(f"Block {idx} already holds a LayerSwitch; call `remove_switches` first.")
        switches[idx] = LayerSwitch(blocks[idx], harmonizer)  # type: ignore[arg-type]
        blocks[idx] = switches[idx]
    _set_blocks_keep_idx(model, blocks)
    return switches


def remove_switches(model: nn.Module) -> None:
    """Put the original blocks back in place of every :class:`LayerSwitch` (in place)."""
    blocks = [b.block if isinstance(b, LayerSwitch) else b for b in get_blocks(model)]
    _set_blocks_keep_idx(model, blocks)


def set_replace_mask(switches: Mapping[int, LayerSwitch], keep: Mapping[int, bool]) -> None:
    """Run the harmonizer at every switched position whose ``keep[index]`` is False."""
    for idx, switch in switches.items():
        switch.replaced = not bool(keep.get(idx, True))


def _set_blocks_keep_idx(model: nn.Module, blocks: list[nn.Module]) -> None:
    # set_blocks renumbers attention.layer_idx of real blocks; a LayerSwitch has no attention attribute, so
    # the wrapped block keeps its own index, which is the same position anyway.
    set_blocks(model, blocks)
