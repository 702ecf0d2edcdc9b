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

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

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


class EmulatorExport(pl.Callback):
    """Write the emulator artifact at the end of the model owner's fit.

    Args:
        output_dir: artifact folder (created; an existing artifact there is replaced).
        adapter_layers: ScaleOT ``N_a`` (only for stage-1 modules; half bottom, half top).
        alpha: ScaleOT replaced fraction of the middle, ``[0, 1)``.
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

    Raises:
        ValueError: for knobs outside their ranges (at construction), or, in ``setup``, for an export that would
            ship original middle matrices: a ScaleOT export with ``beta_mlp=1``, or an undistilled uniform drop.
    """

    def __init__(
        self,
        output_dir: str,
        adapter_layers: int = 4,
        alpha: float = 0.5,
        beta: float = 0.8,
        beta_mlp: float = 0.9,
        distill_steps: int = 0,
        distill_lr: float = 1e-4,
        distill_norm: Literal["global", "per_dim", "global+per_dim"] = "global",
    ) -> None:
        problems = []
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
        if problems:
            raise ValueError("EmulatorExport: " + "; ".join(problems) + ".")
        self.output_dir = output_dir
        self.adapter_layers, self.alpha, self.beta, self.beta_mlp = adapter_layers, alpha, beta, beta_mlp
        self.distill_steps, self.distill_lr, self.distill_norm = distill_steps, distill_lr, distill_norm
        self.distill_kd: tuple[float, float] | None = None
        self.emulator: Any = None
        self.plan: Any = None
        self.seconds = 0.0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "method", None) == "uniform_drop" and trainer.max_steps == 0:
            raise ValueError(
                "EmulatorExport: an undistilled uniform-drop emulator (`trainer.max_steps=0`) ships original middle "
                "blocks and cannot be exported. HINT: distil it (`max_steps` > 0) or use `method: gradot`."
            )
        if hasattr(pl_module, "harmonizers") and self.beta_mlp == 1.0:
            raise ValueError(
                f"EmulatorExport: `beta_mlp=1.0` with `alpha={self.alpha}` ships the kept layers' original MLP "
                "matrices, which an emulator artifact may not hold. HINT: set `beta_mlp` below 1 (e.g. 0.9)."
            )

    def build(self, pl_module: pl.LightningModule) -> tuple[Any, Any, Any]:
        """``(emulator, plan, original model)`` from a distillation or a ScaleOT stage-1 module."""
        if getattr(pl_module, "emulator", None) is not None and hasattr(pl_module, "plan"):
            return pl_module.emulator, pl_module.plan, pl_module.original
        harmonizers = getattr(pl_module, "harmonizers", None)
        if harmonizers is None:
            raise TypeError(f"{type(pl_module).__name__} has neither `emulator`/`plan` nor ScaleOT `harmonizers`.")
        emulator, plan = build_scaleot_emulator(
            pl_module.model,
            pl_module.layer_importance.cpu(),
            harmonizers,
            self.adapter_layers,
            self.alpha,
            self.beta,
            self.beta_mlp,
            next(iter(harmonizers.values())).down.out_features,
        )
        plan.base_model = pl_module.model_name
        return emulator, plan, pl_module.model

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

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        emulator, plan, original = self.build(pl_module)
        self.distill(trainer.datamodule.train_dataloader(), emulator, plan, original)
        if trainer.is_global_zero:
            save_emulator_artifact(self.output_dir, emulator.cpu(), plan, original.cpu())
        self.emulator, self.plan = emulator, plan
        self.seconds = time.perf_counter() - start
        rank_zero_info(f"EmulatorExport: {plan.method} emulator {plan.kinds} written to {self.output_dir}.")


class AdapterExport(pl.Callback):
    """Write the adapter artifact at the end of the data owner's fit (module: ``OffsiteFinetune``).

    Args:
        output_dir: artifact folder (created).
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "adapter_state"):
            raise TypeError(f"{type(pl_module).__name__} has no `adapter_state()`; use OffsiteFinetune.")
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
        model = getattr(pl_module, self.model_attr)
        check_base_model(self.plan, model, what=f"adapter artifact {self.adapter_dir}")
        adapters, plan = load_adapter_artifact(self.adapter_dir)
        plug_adapters(model, adapters, plan)
        self.plugged = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"adapter_dir": self.adapter_dir, "plugged": self.plugged}

