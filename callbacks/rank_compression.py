"""Rank compression of linear layers at setup, before the optimizer exists (ScaleOT SRC, arXiv 2412.09812).

Replaces every linear whose qualified name matches one of ``modules`` (``fnmatch`` patterns relative to
the LightningModule attribute ``model_attr``) by its truncated SVD, in ``setup`` — after the module's
``__init__`` and before checkpoint restore, device placement and ``configure_optimizers``, so optimizers
and restored checkpoints see the compressed shapes. The surgery is a pure function of the weights, so a
resumed run recompresses to the same modules. Reusable on any model, not only emulators: e.g. SRC on the
kept blocks of an emulator, or low-rank attention as an ablation of a full model. Threat model: in
offsite-tuning, the model owner applies it to the emulator blocks only, never to the originals.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from privtune.contracts import model_at
from privtune.emulator.layer_stack import linear_weight
from privtune.emulator.low_rank import compress_linear, full_rank_message, rank_from_ratio

DOCS = "docs/offsite_tuning.md, 'RankCompression'"


class RankCompression(pl.Callback):
    """Truncated-SVD compression of the matching linears at ``setup``.

    Args:
        modules: ``fnmatch`` patterns of module names under ``model_attr``, e.g.
            ``["model.layers.*.self_attn.[qkvo]_proj"]``.
        beta: kept rank fraction, ``r = round(β · min(d_out, d_in))`` per matrix; exclusive with ``rank``.
        rank: one absolute rank for every matched matrix.
        model_attr: attribute of the LightningModule that holds the model.
        stages: setup stages that compress (``fit``, ``validate``, ``test``, ``predict``).

    Contract (:class:`privtune.contracts.BlockModel`): the LightningModule holds the model at ``model_attr``.

    Raises:
        ValueError: if neither or both of ``beta`` / ``rank`` are given, ``beta`` is outside ``(0, 1]``,
            ``rank < 1``; in ``setup``, if no module matches, a match is not a linear layer (e.g. an
            ``nn.Embedding``), or the rank (given, or rounded from ``beta``) is not below a matrix's rank bound
            (all checked before any module changes).
        privtune.contracts.ContractError: in ``setup``, if ``model_attr`` names no model.
    """

    def __init__(
        self,
        modules: list[str],
        beta: float | None = None,
        rank: int | None = None,
        model_attr: str = "model",
        stages: list[str] | None = None,
    ) -> None:
        if (beta is None) == (rank is None):
            raise ValueError(f"Give exactly one of `beta` and `rank` (got beta={beta}, rank={rank}).")
        if beta is not None and not 0.0 < beta <= 1.0:
            raise ValueError(f"`beta={beta}` (kept rank fraction) must be in (0, 1].")
        if rank is not None and rank < 1:
            raise ValueError(f"`rank={rank}` must be >= 1.")
        if not modules:
            raise ValueError("`modules` must list at least one module-name pattern.")
        self.modules = list(modules)
        self.beta, self.rank = beta, rank
        self.model_attr = model_attr
        self.stages = list(stages) if stages is not None else ["fit", "validate", "test", "predict"]
        self.compressed: dict[str, int] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules, beta=self.beta, rank=self.rank)

    def targets(self, root: Any) -> dict[str, int]:
        """``{module name: rank}`` for every module matching ``modules`` (validated, nothing changed).

        Raises:
            ValueError: if a match is not a linear layer (``nn.Linear`` or GPT-2 ``Conv1D``: an ``nn.Embedding``,
                a block, ...), if the rank is not below a matrix's rank bound (the truncation would keep the
                original), or if nothing matches.
        """
        found: dict[str, int] = {}
        shapes: dict[str, tuple[int, int]] = {}
        for name, module in root.named_modules():
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.modules):
                continue
            if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D":
                raise ValueError(
                    f"RankCompression: `modules={self.modules}` matches `{name}` ({type(module).__name__}), which "
                    "is not a linear layer (nn.Linear or GPT-2 Conv1D); only linears can be rank-compressed. HINT: "
                    f"narrow the pattern to linears only, e.g. 'model.layers.*.self_attn.[qkvo]_proj' ({DOCS})."
                )
            weight, _ = linear_weight(module)
            shapes[name] = (int(weight.shape[0]), int(weight.shape[1]))
            bound = min(weight.shape)
            if self.rank is not None and self.rank >= bound:
                raise ValueError(
                    f"RankCompression: `rank={self.rank}` is not below the rank bound {bound} of `{name}` "
                    f"{tuple(weight.shape)}: the truncation would keep the matrix whole. Allowed: rank <= {bound - 1}."
                )
            found[name] = self.rank if self.rank is not None else rank_from_ratio(self.beta, weight.shape)
        if not found:
            raise ValueError(
                f"RankCompression: `modules={self.modules}` matches no linear layer of `{self.model_attr}`; names look "
                f"like 'model.layers.0.self_attn.q_proj' ({DOCS})."
            )
        if self.beta is not None and (message := full_rank_message("beta", self.beta, shapes)):
            raise ValueError(f"RankCompression: {message}.")
        return found

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in self.stages or self.compressed:
            return
        root = model_at(pl_module, self.model_attr, "RankCompression", DOCS)
        plan = self.targets(root)
        for name, rank in plan.items():
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, compress_linear(getattr(parent, child), rank))
        self.compressed = plan
        rank_zero_info(f"RankCompression: {len(plan)} linears compressed (ranks {sorted(set(plan.values()))}).")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"compressed": dict(self.compressed)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("compressed", {})
        if self.compressed and saved and saved != self.compressed:
            raise ValueError("The checkpoint was compressed with other ranks than this RankCompression computes.")
