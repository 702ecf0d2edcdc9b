"""Offsite-tuning steps as Callbacks: export the emulator, export the adapters, plug them in, run the pipeline.

Each party's step is a ``train.py`` run, and these callbacks are the hand-over points between them
(Offsite-Tuning, arXiv 2302.04870; ScaleOT, 2412.09812; GradOT, 2507.04455):

* :class:`EmulatorExport` (model owner, fit end): writes the emulator artifact — the module's own
  emulator (:class:`~privtune.modules.offsite_distill.EmulatorDistillation`), or a ScaleOT emulator generated
  from the stage-1 scores and harmonizers (:class:`~privtune.modules.offsite_importance.HarmonizerImportance`)
  for the knobs ``(N_a, α, β)``. The export refuses to write any original middle-layer matrix.
* :class:`AdapterExport` (data owner, fit end): writes the adapter artifact from
  :class:`~privtune.modules.offsite_finetune.OffsiteFinetune`.
* :class:`PlugAdapters` (model owner, setup): plugs an adapter artifact into any module's model (e.g. a
  :class:`~privtune.modules.TextClassifier` with ``tuning: none`` for the plug-in evaluation), after
  checking the artifact was trained for this base model.
* :class:`~privtune.callbacks.offsite_pipeline.OffsitePipeline` (research, fit end, its own module): runs the
  recipe :mod:`privtune.recipes.offsite` (data-owner tuning and the five evaluation settings in one process).

Threat model: only the artifacts cross between the parties; the private data never leaves the data owner
and the original middle blocks never leave the model owner.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from privtune.contracts import (
    AdapterSource,
    ContractError,
    EmulatorModule,
    HarmonizerStage1Module,
    missing_members,
    model_at,
)
from privtune.emulator import (
    build_scaleot_emulator,
    check_base_model,
    distill_emulator,
    load_adapter_artifact,
    plug_adapters,
    read_plan,
    save_adapter_artifact,
    save_emulator_artifact,
)
from privtune.emulator.artifact import artifact_summary, leak_check_path
from privtune.emulator.build import compression_problems
from privtune.emulator.leak_check import DEFAULT_MIN_REL_ERROR
from privtune.emulator.measured_importance import measured_importance
from privtune.models import num_blocks

DOCS = "docs/offsite_tuning.md"


def scaleot_export_problems(depth: int, adapter_layers: int) -> list[str]:
    """What is wrong with ScaleOT's ``N_a`` for a ``depth``-block model, in plain words (empty: nothing)."""
    if depth - adapter_layers < 1:
        return [
            f"`adapter_layers={adapter_layers}` leaves no middle block to emulate in this {depth}-block model; "
            f"allowed: adapter_layers <= {depth - 1}"
        ]
    return []


def kept_middle_blocks(depth: int, adapter_layers: int, alpha: float) -> int:
    """How many middle blocks a ScaleOT emulator keeps (and compresses): ``|C| - ⌈α·|C|⌉``."""
    middle = depth - adapter_layers
    return middle - math.ceil(alpha * middle - 1e-9)  # the count least_important replaces


class EmulatorExport(pl.Callback):
    """Write the emulator artifact at the end of the model owner's fit.

    Args:
        output_dir: artifact folder (created; an existing artifact there is replaced).
        adapter_layers: ScaleOT ``N_a`` (only for stage-1 modules; half bottom, half top).
        alpha: ScaleOT replaced fraction of the middle, ``[0, 1)``.
        replaced: which ``⌈α·|C|⌉`` middle blocks become harmonizers: ``importance`` (ScaleOT: the least important
            by the stage-1 scores) or ``uniform`` (the blocks Offsite-Tuning's uniform drop drops, evenly spaced:
            the kept blocks are exactly OT's ``l-k-r`` ones; ablation (b) "uniform drop + harmonizers" of
            docs/offsite_tuning.md). Same count, so the same size; the harmonizers are stage 1's either way.
        importance: which scores choose the replaced blocks (``replaced: importance``): ``rl`` (ScaleOT's
            stage-1 REINFORCE scores) or ``measured`` (at fit end, the owner's LM loss rise when each candidate block
            alone runs its trained harmonizer, on ``importance_batches`` held-out batches of the fit's datamodule:
            :func:`~privtune.emulator.measured_importance.measured_importance`; docs/offsite_tuning.md
            "Diagnosis"). The measured scores replace the module's ``layer_importance``, so every emulator built
            from this stage 1 afterwards (the pipeline's α sweep) uses them too.
        importance_batches: held-out batches ``measured`` reads (the datamodule's ``val_dataloader``, else
            ``train_dataloader``).
        beta: ScaleOT kept rank fraction of the kept layers' attention matrices, ``(0, 1]``.
        beta_mlp: kept rank fraction of their MLP matrices, ``(0, 1]``; below 1 so that no original matrix
            is shipped (privtune's artifact rule; ScaleOT itself leaves the FFN as it is).
        distill_steps: after the emulator is built, distil its middle (harmonizers, compressed blocks) towards
            the original model with Offsite-Tuning's KD objective for this many steps on the fit's training
            batches (:func:`~privtune.emulator.distill.distill_emulator`); 0 (default) ships it as built.
            ScaleOT ships its emulator without this step; privtune offers it because the harmonizers are trained
            with sampled, not final, replacement sets, and the final set is what the data owner tunes on.
        distill_lr: AdamW learning rate of that distillation.
        distill_norm: normalisation of its KD term: ``global`` (Offsite-Tuning), ``per_dim`` (each hidden dimension
            by its own scale) or their sum, ``global+per_dim``; see
            :func:`~privtune.emulator.distill.normalized_kd_loss`.
        model_attr: attribute of a ScaleOT stage-1 module that holds the original model.
        min_rel_error: the leak check's threshold: no emulator matrix may come within this relative Frobenius
            error of an original middle matrix, after the best scale and sign and row or column matching
            (:mod:`privtune.emulator.leak_check`; default ``1e-2``, which ScaleOT's ``β = 0.8`` / ``0.9`` passes).

    There is deliberately no knob to export uncompressed kept blocks (``beta = beta_mlp = 1``): they are original
    middle matrices, which never leave the model owner, so ``setup`` refuses them. ScaleOT without SRC (ablation
    (e)) is measured owner-side instead, by :class:`~privtune.callbacks.offsite_pipeline.OffsitePipeline`'s
    ``scaleot_no_src``, which puts the original blocks back into this artifact's emulator in process and writes
    no emulator.

    Contract: a ScaleOT stage-1 module (:class:`privtune.contracts.HarmonizerStage1Module`: the model at
    ``model_attr``, ``model_name``, ``harmonizers`` filled by ``LayerReplace``, ``layer_importance``) or an
    emulator-building module (:class:`privtune.contracts.EmulatorModule`); with ``distill_steps``, a datamodule.

    Raises:
        ValueError: for knobs outside their ranges (at construction); in ``setup``, before any training step, for an
            export that would ship original middle matrices (``beta`` or ``beta_mlp`` at 1 or rounding to full rank
            on this model, an undistilled uniform drop), ``adapter_layers`` leaving no middle block, or a split
            that disagrees with the candidate layers ``LayerReplace`` trains harmonizers for.
        privtune.contracts.ContractError: in ``setup``, when the module or the trainer lacks what the export reads.
        privtune.emulator.OriginalTensorError: at fit end, if the leak check finds an original matrix (nothing is
            written).
    """

    def __init__(
        self,
        output_dir: str,
        adapter_layers: int = 4,
        alpha: float = 0.5,
        replaced: Literal["importance", "uniform"] = "importance",
        importance: Literal["rl", "measured"] = "rl",
        importance_batches: int = 4,
        beta: float = 0.8,
        beta_mlp: float = 0.9,
        distill_steps: int = 0,
        distill_lr: float = 1e-4,
        distill_norm: Literal["global", "per_dim", "global+per_dim"] = "global",
        model_attr: str = "model",
        min_rel_error: float = DEFAULT_MIN_REL_ERROR,
    ) -> None:
        problems = []
        if not 0.0 < min_rel_error < 1.0:
            problems.append(f"`min_rel_error={min_rel_error}` must be in (0, 1)")
        if distill_steps < 0:
            problems.append(f"`distill_steps={distill_steps}` must be >= 0")
        if distill_lr <= 0:
            problems.append(f"`distill_lr={distill_lr}` must be > 0")
        if distill_norm not in ("global", "per_dim", "global+per_dim"):
            problems.append(f"`distill_norm={distill_norm!r}` must be 'global', 'per_dim' or 'global+per_dim'")
        if not 0.0 <= alpha < 1.0:
            problems.append(f"`alpha={alpha}` (replaced fraction) must be in [0, 1)")
        for name, value in (("beta", beta), ("beta_mlp", beta_mlp)):
            if not 0.0 < value <= 1.0:
                problems.append(f"`{name}={value}` (kept rank fraction) must be in (0, 1]")
        if adapter_layers < 0:
            problems.append(f"`adapter_layers={adapter_layers}` must be >= 0")
        if replaced not in ("importance", "uniform"):
            problems.append(f"`replaced={replaced!r}` must be 'importance' or 'uniform'")
        if importance not in ("rl", "measured"):
            problems.append(f"`importance={importance!r}` must be 'rl' or 'measured'")
        if importance_batches < 1:
            problems.append(f"`importance_batches={importance_batches}` must be >= 1")
        if problems:
            raise ValueError("EmulatorExport: " + "; ".join(problems) + ".")
        self.output_dir = output_dir
        self.adapter_layers, self.alpha, self.beta, self.beta_mlp = adapter_layers, alpha, beta, beta_mlp
        self.replaced = replaced
        self.importance, self.importance_batches = importance, importance_batches
        self.measured_scores: list[float] | None = None
        self.distill_steps, self.distill_lr, self.distill_norm = distill_steps, distill_lr, distill_norm
        self.model_attr, self.min_rel_error = model_attr, min_rel_error
        self.summary: dict[str, Any] = {}
        self._split_checked = False
        self.distill_kd: tuple[float, float] | None = None
        self.emulator: Any = None
        self.plan: Any = None
        self.seconds = 0.0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.distill_steps and not callable(getattr(trainer.datamodule, "train_dataloader", None)):
            raise ContractError(
                f"EmulatorExport: `distill_steps={self.distill_steps}` distils on "
                "`trainer.datamodule.train_dataloader()`, but the fit has no datamodule. HINT: pass one to "
                f"`trainer.fit(..., datamodule=...)` or set `distill_steps: 0` ({DOCS})."
            )
        if self.importance == "measured" and not callable(getattr(trainer.datamodule, "train_dataloader", None)):
            raise ContractError(
                "EmulatorExport: `importance: measured` reads held-out batches from the fit's datamodule, but the "
                f"fit has none. HINT: pass one to `trainer.fit(..., datamodule=...)` or use `importance: rl` ({DOCS})."
            )
        if not missing_members(pl_module, EmulatorModule):
            if self.importance == "measured":
                raise ValueError(
                    f"EmulatorExport: `importance: measured` scores ScaleOT's harmonizers, but "
                    f"{type(pl_module).__name__} builds its own emulator. HINT: use `importance: rl` ({DOCS})."
                )
            if getattr(pl_module, "method", None) == "uniform_drop" and trainer.max_steps == 0:
                raise ValueError(
                    "EmulatorExport: an undistilled uniform-drop emulator (`trainer.max_steps=0`) ships original "
                    "middle blocks and cannot be exported. HINT: distil it (`max_steps` > 0) or use `method: gradot`."
                )
            return
        missing = missing_members(pl_module, HarmonizerStage1Module)
        if missing:
            raise ContractError(
                f"EmulatorExport: {type(pl_module).__name__} is neither a ScaleOT stage-1 module (missing "
                f"{missing}: HarmonizerStage1Module) nor an emulator-building module (`emulator`, `plan`, `original`: "
                f"EmulatorModule, privtune.contracts). HINT: use HarmonizerImportance with LayerReplace, or "
                f"EmulatorDistillation ({DOCS})."
            )
        if not isinstance(pl_module.model_name, str) or not pl_module.model_name:
            raise ContractError(
                f"EmulatorExport: {type(pl_module).__name__}.model_name={pl_module.model_name!r} must name the base "
                f"model (it is recorded in the emulator plan for the data owner's checks; {DOCS})."
            )
        model = model_at(pl_module, self.model_attr, "EmulatorExport", DOCS)
        try:
            depth = num_blocks(model)
        except (TypeError, ValueError, AttributeError) as err:
            raise ContractError(
                f"EmulatorExport: the model at `model_attr={self.model_attr!r}` has no block list ({err}; {DOCS})."
            ) from err
        problems = scaleot_export_problems(depth, self.adapter_layers)
        if not problems and kept_middle_blocks(depth, self.adapter_layers, self.alpha):
            problems = compression_problems(model, self.beta, self.beta_mlp)
        if problems:
            raise ValueError(f"EmulatorExport: {'; '.join(problems)} ({DOCS}).")
        self._check_split(pl_module, depth, at_fit_start=False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._split_checked and missing_members(pl_module, EmulatorModule):
            self._check_split(pl_module, num_blocks(getattr(pl_module, self.model_attr)), at_fit_start=True)

    def _check_split(self, pl_module: pl.LightningModule, depth: int, at_fit_start: bool) -> None:
        """The export's middle must be exactly the layers ``LayerReplace`` trains harmonizers (and scores) for."""
        harmonizers = pl_module.harmonizers
        if not len(harmonizers):
            if not at_fit_start:
                return  # LayerReplace is listed after this callback: its setup has not run yet; checked at fit start
            raise ContractError(
                f"EmulatorExport: {type(pl_module).__name__}.harmonizers is empty at fit start: nothing trains the "
                "harmonizers the ScaleOT emulator needs. HINT: add the LayerReplace callback "
                f"(privtune.callbacks.LayerReplace; {DOCS})."
            )
        candidates = sorted(int(k) for k in harmonizers)
        bottom = self.adapter_layers // 2
        middle = list(range(bottom, depth - (self.adapter_layers - bottom)))
        if candidates != middle:
            raise ValueError(
                f"EmulatorExport: `adapter_layers={self.adapter_layers}` makes blocks {middle} the middle of this "
                f"{depth}-block model, but LayerReplace trains harmonizers and scores for blocks {candidates}; "
                f"the two splits must agree. HINT: set LayerReplace `adapter_bottom={bottom}`, `adapter_top="
                f"{self.adapter_layers - bottom}` (or `adapter_layers={depth - len(candidates)}` if its candidates "
                f"are the middle) ({DOCS})."
            )
        self._split_checked = True

    def build(self, pl_module: pl.LightningModule) -> tuple[Any, Any, Any]:
        """``(emulator, plan, original model)`` from a distillation or a ScaleOT stage-1 module."""
        if getattr(pl_module, "emulator", None) is not None and hasattr(pl_module, "plan"):
            return pl_module.emulator, pl_module.plan, pl_module.original
        harmonizers = getattr(pl_module, "harmonizers", None)
        if harmonizers is None:
            raise TypeError(f"{type(pl_module).__name__} has neither `emulator`/`plan` nor ScaleOT `harmonizers`.")
        model = getattr(pl_module, self.model_attr)
        emulator, plan = build_scaleot_emulator(
            model,
            pl_module.layer_importance.cpu(),
            harmonizers,
            self.adapter_layers,
            self.alpha,
            self.beta,
            self.beta_mlp,
            next(iter(harmonizers.values())).down.out_features,
            self.replaced,
        )
        plan.base_model = pl_module.model_name
        return emulator, plan, model

    def distill(self, loader: Iterable[dict[str, Any]], emulator: Any, plan: Any, original: Any) -> None:
        """Distil the built emulator on ``loader``'s LM batches (``distill_steps`` > 0 only)."""
        if not self.distill_steps:
            return
        device = next(original.parameters()).device
        batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in loader]
        self.distill_kd = distill_emulator(
            original, emulator.to(device), plan, batches, self.distill_steps, self.distill_lr,
            kd_norm=self.distill_norm,
        )  # fmt: skip
        plan.info |= {"distill_steps": self.distill_steps, "distill_norm": self.distill_norm}
        rank_zero_info(
            f"EmulatorExport: distilled the emulator for {self.distill_steps} steps, {self.distill_norm} KD "
            f"{self.distill_kd[0]:.3f} -> {self.distill_kd[1]:.3f}."
        )

    def measure_importance(self, datamodule: Any, pl_module: pl.LightningModule) -> None:
        """``importance: measured``: score each candidate block by the loss rise its harmonizer alone causes on
        ``importance_batches`` held-out batches, and make those the module's ``layer_importance``."""
        getter = getattr(datamodule, "val_dataloader", None)
        loader = getter() if callable(getter) else None
        if not loader:
            loader = datamodule.train_dataloader()
        model = getattr(pl_module, self.model_attr)
        device = next(model.parameters()).device
        batches = []
        for batch in loader:
            if len(batches) == self.importance_batches:
                break
            batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        scores = measured_importance(model, pl_module.harmonizers, batches)
        pl_module.layer_importance = scores.to(pl_module.layer_importance.device)
        self.measured_scores = scores.tolist()
        order = sorted(zip(self.measured_scores, sorted(int(k) for k in pl_module.harmonizers)))
        rank_zero_info(
            f"EmulatorExport: measured importance on {len(batches)} held-out batches (loss rise, lowest first): "
            + ", ".join(f"{i}:{v:+.3f}" for v, i in order)
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        if self.importance == "measured" and missing_members(pl_module, EmulatorModule):
            self.measure_importance(trainer.datamodule, pl_module)
        emulator, plan, original = self.build(pl_module)
        if self.measured_scores is not None:
            plan.info |= {"importance": "measured", "measured_importance": self.measured_scores}
        self.distill(trainer.datamodule.train_dataloader(), emulator, plan, original)
        if trainer.is_global_zero:
            save_emulator_artifact(self.output_dir, emulator.cpu(), plan, original.cpu(), self.min_rel_error)
            self.summary = artifact_summary(self.output_dir)
        self.emulator, self.plan = emulator, plan
        self.seconds = time.perf_counter() - start
        closeness = self.summary.get("closeness") or {}
        shared = ""
        if closeness.get("kept_rel_error_range"):
            lo, hi = closeness["kept_rel_error_range"]
            record = leak_check_path(self.output_dir)
            shared = f" Kept matrices at relative error {lo:.3f}-{hi:.3f} from their originals ({record})."
        rank_zero_info(f"EmulatorExport: {plan.method} emulator {plan.kinds} written to {self.output_dir}.{shared}")


class AdapterExport(pl.Callback):
    """Write the adapter artifact at the end of the data owner's fit (module: ``OffsiteFinetune``).

    Args:
        output_dir: artifact folder (created).
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        missing = missing_members(pl_module, AdapterSource)
        if stage == "fit" and missing:
            raise ContractError(
                f"AdapterExport: {type(pl_module).__name__} has no {missing} (AdapterSource in privtune.contracts): "
                f"the export writes `adapter_state()` with the emulator `plan`. HINT: use OffsiteFinetune ({DOCS})."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            save_adapter_artifact(self.output_dir, pl_module.adapter_state(), pl_module.plan)
        rank_zero_info(
            f"AdapterExport: adapters of blocks {pl_module.plan.split.adapter_indices} -> {self.output_dir}."
        )


class PlugAdapters(pl.Callback):
    """Plug an adapter artifact into the module's model at ``setup`` (Offsite-Tuning plug-in).

    Args:
        adapter_dir: adapter artifact folder (from :class:`AdapterExport`).
        model_attr: attribute of the LightningModule holding the original model.

    Raises:
        ValueError: at construction if ``adapter_dir`` is not an adapter artifact; in ``setup``, if the model is
            not the base model the adapters were trained for (before any weight changes).
        privtune.contracts.ContractError: in ``setup``, if ``model_attr`` names no model.
    """

    def __init__(self, adapter_dir: str, model_attr: str = "model") -> None:
        if not (Path(adapter_dir) / "adapters.pt").is_file():
            raise ValueError(f"`adapter_dir={adapter_dir!r}` is not an adapter artifact folder (no adapters.pt).")
        self.plan = read_plan(adapter_dir)
        self.adapter_dir = adapter_dir
        self.model_attr = model_attr
        self.plugged = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.plugged:
            return
        model = model_at(pl_module, self.model_attr, "PlugAdapters", DOCS)
        check_base_model(self.plan, model, what=f"adapter artifact {self.adapter_dir}")
        adapters, plan = load_adapter_artifact(self.adapter_dir)
        plug_adapters(model, adapters, plan)
        self.plugged = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"adapter_dir": self.adapter_dir, "plugged": self.plugged}
