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

from collections.abc import Callable, Iterable, Mapping, Sequence

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


@torch.no_grad()
def _block_io(model: nn.Module, switches: Mapping[int, LayerSwitch], batch: Mapping[str, Tensor]) -> dict:
    """``{block index: (h_in, h_out)}``, each ``[B, T, d]``, from one forward of the original model."""
    captured: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(idx: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            captured[idx] = (h_in.detach(), h_out.detach())

        return record

    set_replace_mask(switches, {})
    handles = [s.block.register_forward_hook(hook(i), with_kwargs=True) for i, s in switches.items()]
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def block_errors(
    switches: Mapping[int, LayerSwitch], io: Mapping[int, tuple[Tensor, Tensor]], attention_mask: Tensor
) -> dict[int, Tensor]:
    """Each harmonizer's normalised error against its block: ``||H_i(h_in) - h_out||^2 / ||h_out - h_in||^2``.

    Summed over the real tokens (``attention_mask`` ``[B, T]``) of the block's recorded input and output (``io``,
    from :func:`_block_io`); ``1.0`` is a plain layer drop (an identity harmonizer), ``0`` the block itself. The
    result keeps the harmonizers' autograd graph, so the one definition serves the warm start, the stage-1
    imitation term and the diagnostic curve.
    """
    if not io:
        return {}
    mask = attention_mask.unsqueeze(-1).to(next(iter(io.values()))[0].dtype)  # [B, T, 1]
    out = {}
    for idx, switch in switches.items():
        h_in, h_out = io[idx]
        num = ((switch.harmonizer(h_in) - h_out) ** 2 * mask).sum()
        out[idx] = num / (((h_out - h_in) ** 2 * mask).sum() + 1e-12)
    return out


def warm_start_harmonizers(
    model: nn.Module,
    switches: Mapping[int, LayerSwitch],
    batches: Iterable[Mapping[str, Tensor]],
    steps_per_batch: int = 4,
    lr: float = 1e-3,
) -> tuple[float, float]:
    """Fit each harmonizer to its own block, layer by layer, before ScaleOT's end-to-end stage 1.

    Decision (not in the paper, which trains harmonizers only end to end under Dynamic LayerReplace): a
    harmonizer starts as the identity (plain layer drop); this warm start regresses it onto the residual map of
    the block it stands for, on the block's real inputs from the owner's public text::

        min  sum_i  ||H_i(h_in) - h_out||^2 / ||h_out - h_in||^2        (h_in, h_out: block i's input, output)

    so every harmonizer first learns the per-token part of its block (a token-wise FFN cannot mix tokens as
    attention does; stage 1 then tunes it in context). One forward of the original model gives every block's
    pair, so the cost is one forward per batch plus tiny low-rank steps. The normalisation makes every block
    count equally, whatever its residual's scale.

    Args:
        model: the model with :class:`LayerSwitch` es installed (their blocks frozen).
        switches: ``{block index: switch}`` from :func:`install_switches`.
        batches: LM batches (``input_ids``, ``attention_mask``) on the model's device.
        steps_per_batch: Adam steps on each batch's activations.
        lr: Adam learning rate.

    Returns:
        ``(error before, error after)``: the mean normalised residual error over blocks on the first and last
        batch (1.0 before = a fresh identity harmonizer).
    """
    harmonizers = [s.harmonizer for s in switches.values()]
    optimizer = torch.optim.Adam([p for h in harmonizers for p in h.parameters()], lr=lr)
    losses: list[float] = []
    for batch in batches:
        io = _block_io(model, switches, batch)
        for _ in range(steps_per_batch):
            loss = torch.stack(list(block_errors(switches, io, batch["attention_mask"]).values())).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    if not losses:
        raise ValueError("warm_start_harmonizers got no batch.")
    return losses[0], losses[-1]
