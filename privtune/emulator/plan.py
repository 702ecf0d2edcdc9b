"""What an emulator is made of: :class:`EmulatorPlan`, a JSON-serialisable record, and the plan builders.

A plan lists, in depth order, the emulator's middle positions and what sits at each (``block``: a copy of
original block ``source``, possibly rank-compressed; ``harmonizer``: the harmonizer trained for block
``source``), plus the sandwich split and the module surgery applied to the kept blocks (so a data owner can
rebuild the exact shapes from a config alone). The same plan is stored in the emulator artifact and in the
adapter artifact, so training, evaluation and plug-in always agree on which original index each adapter
belongs to (Offsite-Tuning's 7B evaluation scripts rebuilt the emulator differently from training; one
plan, one builder prevents that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import Tensor

from privtune.emulator.importance import least_important
from privtune.emulator.layer_drop import uniform_keep_indices, uniform_keep_layers
from privtune.emulator.layer_stack import SandwichSplit

Kind = Literal["block", "harmonizer"]
ReplaceChoice = Literal["importance", "uniform"]
PLAN_VERSION = 1


@dataclass
class EmulatorPlan:
    """The structure of one emulator.

    Attributes:
        num_layers: ``L``, depth of the original model.
        adapter_bottom: ``l``, bottom adapter blocks ``[0, l)``.
        adapter_top: ``r``, top adapter blocks ``[L - r, L)``.
        middle: ``[(source index, kind), ...]`` in depth order; sources are middle indices, strictly increasing.
        method: ``uniform_drop``, ``scaleot`` or ``gradot`` (informational).
        harmonizer_rank: bottleneck width of the harmonizers at ``harmonizer`` positions.
        modules: surgery on kept blocks, ``{"<emulator position>.<module path>": spec}`` with spec
            ``{"type": "low_rank" | "linear", "in_features", "out_features", "rank", "bias"}``.
        base_model: the original model's ``name_or_path``.
        base_fingerprint: :func:`privtune.emulator.build.model_fingerprint` of the original model.
        info: the knobs that produced the plan (for reports), e.g. ``{"alpha": 0.5, "beta": 0.8}``.
    """

    num_layers: int
    adapter_bottom: int
    adapter_top: int
    middle: list[tuple[int, Kind]]
    method: str = "uniform_drop"
    harmonizer_rank: int = 64
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_model: str = ""
    base_fingerprint: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self.middle = [(int(s), str(k)) for s, k in self.middle]  # type: ignore[misc]
        split = self.split  # validates the counts
        allowed = set(split.middle_indices)
        sources = [s for s, _ in self.middle]
        problems = []
        if not sources:
            problems.append("the emulator has no middle position")
        if any(s not in allowed for s in sources):
            problems.append(f"sources {sources} must lie in the middle range {split.middle_indices}")
        if sources != sorted(set(sources)):
            problems.append(f"sources {sources} must be strictly increasing")
        bad = [k for _, k in self.middle if k not in ("block", "harmonizer")]
        if bad:
            problems.append(f"kinds {bad} must be 'block' or 'harmonizer'")
        if problems:
            raise ValueError("Invalid `EmulatorPlan`: " + "; ".join(problems) + ".")

    @property
    def split(self) -> SandwichSplit:
        """The validated sandwich split."""
        return SandwichSplit(self.num_layers, self.adapter_bottom, self.adapter_top)

    @property
    def layer_map(self) -> list[int]:
        """Original block index of every emulator position (harmonizers: the block they replace)."""
        split = self.split
        return split.bottom_indices + [s for s, _ in self.middle] + split.top_indices

    @property
    def kinds(self) -> list[str]:
        """``adapter``, ``block`` or ``harmonizer`` for every emulator position."""
        return ["adapter"] * self.adapter_bottom + [k for _, k in self.middle] + ["adapter"] * self.adapter_top

    @property
    def adapter_positions(self) -> dict[int, int]:
        """``{emulator position: original index}`` of the adapter blocks."""
        return {pos: orig for pos, (orig, kind) in enumerate(zip(self.layer_map, self.kinds)) if kind == "adapter"}

    @property
    def depth(self) -> int:
        """Number of blocks in the emulator model."""
        return self.adapter_bottom + len(self.middle) + self.adapter_top

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through :meth:`from_dict`)."""
        out = asdict(self)
        out["middle"] = [list(m) for m in self.middle]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmulatorPlan:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        version = data.get("version", PLAN_VERSION)
        if version > PLAN_VERSION:
            raise ValueError(f"Emulator plan version {version} is newer than this privtune ({PLAN_VERSION}).")
        data["middle"] = [tuple(m) for m in data["middle"]]
        return cls(**data)


def uniform_drop_plan(num_layers: int, adapter_bottom: int, adapter_top: int, emulator_layers: int) -> EmulatorPlan:
    """Offsite-Tuning ``l-k-r`` plan: keep ``k`` evenly spaced middle blocks (see :mod:`layer_drop`)."""
    kept = uniform_keep_layers(num_layers, emulator_layers, adapter_bottom, adapter_top)
    return EmulatorPlan(
        num_layers,
        adapter_bottom,
        adapter_top,
        [(i, "block") for i in kept],
        method="uniform_drop",
        info={"emulator_layers": emulator_layers},
    )


def uniform_replaced(candidates: Sequence[int], alpha: float) -> list[int]:
    """The ``⌈α · |C|⌉`` candidates that Offsite-Tuning's uniform drop would drop, sorted by index.

    The complement of OT's evenly spaced kept set (:func:`~privtune.emulator.layer_drop.uniform_keep_indices`
    with ``k = |C| - ⌈α · |C|⌉``: stride ``(|C| - 1) / (k - 1)``, first and last candidates kept), so the
    blocks kept are exactly those of OT's ``l-k-r`` emulator and only the dropped ones differ (harmonizers in
    their place instead of nothing). The count is the one :func:`~privtune.emulator.importance.least_important`
    replaces for the same ``α``, which keeps an ablation at equal size.

    Raises:
        ValueError: if ``alpha`` is outside ``[0, 1)``.

    Example:
        >>> uniform_replaced(list(range(2, 28)), 0.5)  # SmolLM2's 26 middle blocks: OT 2-13-2 keeps the others
        [3, 5, 7, 9, 11, 13, 15, 16, 18, 20, 22, 24, 26]
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"`alpha={alpha}` (replaced fraction) must be in [0, 1).")
    count = math.ceil(alpha * len(candidates) - 1e-9)  # as least_important counts
    keep = len(candidates) - count
    kept = {candidates[j] for j in uniform_keep_indices(len(candidates), keep)} if keep else set()
    return [c for c in candidates if c not in kept]


def scaleot_plan(
    num_layers: int,
    adapter_layers: int,
    scores: Tensor,
    alpha: float,
    harmonizer_rank: int = 64,
    replaced: ReplaceChoice = "importance",
) -> EmulatorPlan:
    """ScaleOT plan for the knobs ``(N_a, α)``: the least important middle blocks become harmonizers.

    Args:
        num_layers: ``L``.
        adapter_layers: ``N_a``, split as ``N_a // 2`` bottom and ``N_a - N_a // 2`` top blocks (OT convention).
        scores: ``[L - N_a]`` importance scores of the middle blocks, in depth order.
        alpha: replaced fraction of the middle, ``0 <= α < 1``; ``⌈α · |C|⌉`` blocks are replaced.
        harmonizer_rank: bottleneck of the harmonizers.
        replaced: which blocks become harmonizers: ``importance`` (ScaleOT: the lowest scores) or ``uniform``
            (ablation (b) of docs/offsite_tuning.md: the blocks OT's uniform drop drops, evenly spaced, see
            :func:`uniform_replaced`; the scores are then only checked for their count). Same count either way.

    Raises:
        ValueError: if ``adapter_layers`` leaves no middle, ``alpha`` is outside ``[0, 1)``, the score count
            does not match the middle, or ``replaced`` is unknown.
    """
    if adapter_layers < 0:
        raise ValueError(f"`adapter_layers={adapter_layers}` must be >= 0.")
    if replaced not in ("importance", "uniform"):
        raise ValueError(f"`replaced={replaced!r}` must be 'importance' or 'uniform'.")
    split = SandwichSplit(num_layers, adapter_layers // 2, adapter_layers - adapter_layers // 2)
    chosen = set(least_important(scores, split.middle_indices, alpha))  # validates alpha and the score count
    if replaced == "uniform":
        chosen = set(uniform_replaced(split.middle_indices, alpha))
    middle = [(i, "harmonizer" if i in chosen else "block") for i in split.middle_indices]
    return EmulatorPlan(
        num_layers,
        split.bottom,
        split.top,
        middle,  # type: ignore[arg-type]
        method="scaleot",
        harmonizer_rank=harmonizer_rank,
        info={"adapter_layers": adapter_layers, "alpha": alpha, "replaced": replaced},
    )
