"""Run the offsite-tuning recipe after the model owner's fit: one config, the whole experiment.

:class:`OffsitePipeline` is the thin hook that lets ``python train.py fit --config configs/default.yaml`` run
Offsite-Tuning / ScaleOT end to end (arXiv 2302.04870, 2412.09812): after the model owner's stage (ScaleOT stage 1
or emulator distillation, whose emulator :class:`~privtune.callbacks.offsite_tuning.EmulatorExport` writes), it
hands the emulator folder, the stage-1 state and the knobs to :class:`~privtune.recipes.offsite.OffsiteRecipe`,
which runs the data owner's tuning and the five evaluation settings in nested Trainers built from this run's
device, precision and logger. The work lives in the recipe; this callback holds no experiment logic.

Threat model: a research harness playing both parties in one process; only artifact folders cross between them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from privtune.callbacks.layer_replace import LayerReplace
from privtune.callbacks.offsite_tuning import EmulatorExport
from privtune.contracts import conforms
from privtune.eval.provenance import run_provenance
from privtune.recipes.offsite import (
    EmulatorKnobs,
    NestedTrainers,
    OffsiteRecipe,
    PipelineSettings,
    ScaleOTStage1,
    ScaleOTStage1Module,
    StageProgress,
    check_task,
)

#: the model owner's stage-1 / distillation time in the report's ``stage_seconds`` (read by the ablation benchmark)
STAGE1_SECONDS = "stage-1 / distillation (fit)"


class OffsitePipeline(pl.Callback):
    """After the model owner's fit, run the data owner's tuning and the five settings; write the report.

    Needs an :class:`~privtune.callbacks.offsite_tuning.EmulatorExport` earlier in ``trainer.callbacks`` (its
    artifact is the emulator evaluated). Nested Trainers use this run's device, precision and logger.

    Args:
        output_dir: where the adapter artifacts and ``offsite_report.{json,md,png}`` go.
        task: the data owner's private task: ``tweets``, ``bbc_news`` or a CSV / JSON-lines file with ``text`` and
            ``label`` columns (then give ``label_words``).
        train_size: training examples of the task.
        val_size: validation examples.
        test_size: test examples (all settings use the same ones).
        max_length: tokens per example.
        batch_size: training batch size.
        max_steps: adapter-tuning steps (the same on every emulator and for the full-model baseline).
        lr: adapter learning rate.
        tuning: ``full`` (all adapter weights) or ``lora`` inside the adapter blocks.
        alphas: extra ScaleOT ``α`` values to sweep (emulator re-generated from the same stage-1 run; each
            adds an emulator fine-tuning and a plug-in evaluation).
        uniform_drop_layers: also tune and plug Offsite-Tuning's undistilled 2-k-2 uniform drop with this ``k``
            (a row beside the exported emulator in the same table); ``None`` for none.
        uniform_drop_distill_steps: distil that uniform drop first with Offsite-Tuning's KD objective for this many
            steps on the fit's training batches (the owner's public text), in this process, never exported (arm
            ``..._kd<steps>``; :attr:`~privtune.recipes.offsite.PipelineSettings.uniform_drop_distill_steps`); 0: off.
            Its state and batches are saved every 50 steps under ``output_dir/distillation_state/`` (removed once
            the report is written): a fit resumed with ``--ckpt_path`` continues a killed run's distillation on the
            batches it started with, a fresh fit starts it over.
        uniform_drop_distill_lr: AdamW learning rate of that distillation (OT's 1e-4).
        scaleot_no_src: also tune and plug the exported ScaleOT emulator with its kept blocks put back uncompressed
            (ablation (e), ScaleOT without SRC, same size), built in this process and never written
            (:func:`~privtune.recipes.offsite.restore_kept_blocks`).
        extraction: also fine-tune every parameter of the exported emulator on the task (the privacy audit's
            stronger data owner) and report its accuracy and the extraction gap ``plug-in − extraction``.
        extraction_lr: learning rate of that run.
        seed: seed of the task split and the tuning runs.
        title: first line of the report.
        template: prompt of a file task (one ``{text}`` slot).
        label_words: label words of a file task, in ``label_names`` order.
        label_names: class order of a file task.
        progress_every: a progress line every this many training steps of each nested run.
        membership_audit: audit every delivered model for membership leakage: each arm's plug-in model (the
            exported emulator's, OT's uniform drop, ScaleOT without SRC, each ``alphas`` emulator) and full
            fine-tuning of the same blocks (``full_ft``); members are the data owner's training split, non-members its
            test split (:class:`~privtune.recipes.offsite_membership.PlugInAudit`). The reports go into
            ``offsite_report.json`` under ``membership``, one per arm, with ``membership_report.json``'s schema.
        audit_examples: at most this many members and as many non-members.
        audit_seed: seed of the member / non-member draw and of the bootstrap.
        audit_reference: also score the examples with the untuned base model (the calibrated ``reference``
            attack).

    Raises:
        ValueError: at construction for an unknown task or tuning, a non-positive size or step count, or
            ``audit_examples < 2``; in
            ``setup`` without an ``EmulatorExport`` before it, for a multi-process run, or for ``alphas`` after a
            module that is not a ScaleOT stage-1 module.
    """

    def __init__(
        self,
        output_dir: str,
        task: Literal["tweets", "bbc_news"] | str = "tweets",
        train_size: int = 400,
        val_size: int = 64,
        test_size: int = 300,
        max_length: int = 64,
        batch_size: int = 16,
        max_steps: int = 40,
        lr: float = 1e-4,
        tuning: Literal["full", "lora"] = "full",
        alphas: list[float] | None = None,
        uniform_drop_layers: int | None = None,
        uniform_drop_distill_steps: int = 0,
        uniform_drop_distill_lr: float = 1e-4,
        scaleot_no_src: bool = False,
        extraction: bool = False,
        extraction_lr: float = 2e-5,
        seed: int = 0,
        title: str = "",
        template: str = "Text: {text}\nLabel:",
        label_words: list[str] | None = None,
        label_names: list[str] | None = None,
        progress_every: int = 10,
        membership_audit: bool = False,
        audit_examples: int = 128,
        audit_seed: int = 0,
        audit_reference: bool = True,
    ) -> None:
        self.settings = PipelineSettings(
            output_dir=output_dir,
            task=task,
            train_size=train_size,
            val_size=val_size,
            test_size=test_size,
            max_length=max_length,
            batch_size=batch_size,
            max_steps=max_steps,
            lr=lr,
            tuning=tuning,
            alphas=list(alphas or []),
            uniform_drop_layers=uniform_drop_layers,
            uniform_drop_distill_steps=uniform_drop_distill_steps,
            uniform_drop_distill_lr=uniform_drop_distill_lr,
            scaleot_no_src=scaleot_no_src,
            extraction=extraction,
            extraction_lr=extraction_lr,
            seed=seed,
            title=title,
            template=template,
            label_words=label_words,
            label_names=label_names,
            progress_every=progress_every,
            membership_audit=membership_audit,
            audit_examples=audit_examples,
            audit_seed=audit_seed,
            audit_reference=audit_reference,
        )  # validates
        self.trainers: NestedTrainers | None = None
        self.report: dict[str, Any] = {}
        self._fit_start: float | None = None
        self._owner_seconds_before = 0.0  # the model owner's fit time before the checkpoint this run resumed from
        self._resumed_at: list[int] = []
        self._resuming = False  # this fit restores a checkpoint (`trainer.ckpt_path`, set by `on_fit_start`)
        self._provenance: dict[str, Any] = {}
        self._owner_progress = StageProgress("model owner (stage 1 / distillation)", progress_every)
        self._owner_curves: dict[str, list[float]] = {"step": []}

    def _export(self, trainer: pl.Trainer) -> EmulatorExport:
        callbacks = list(trainer.callbacks)
        mine = callbacks.index(self) if self in callbacks else len(callbacks)
        export = next((cb for cb in callbacks[:mine] if isinstance(cb, EmulatorExport)), None)
        if export is None:
            raise ValueError(
                "OffsitePipeline needs an EmulatorExport callback before it in `trainer.callbacks` (its artifact is "
                "the emulator evaluated). HINT: list EmulatorExport first, as configs/default.yaml does."
            )
        return export

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._export(trainer)
        if self.settings.alphas and not conforms(pl_module, ScaleOTStage1Module):
            raise ValueError(
                f"OffsitePipeline: `alphas={self.settings.alphas}` re-generate ScaleOT emulators from stage 1, but "
                f"{type(pl_module).__name__} has no `layer_importance` / `harmonizers`. HINT: use "
                "HarmonizerImportance with LayerReplace, or leave `alphas` empty."
            )
        if self.settings.scaleot_no_src and not conforms(pl_module, ScaleOTStage1Module):
            raise ValueError(
                f"OffsitePipeline: `scaleot_no_src` undoes the rank compression of a ScaleOT emulator, but "
                f"{type(pl_module).__name__} is not a ScaleOT stage-1 module. HINT: use HarmonizerImportance with "
                "LayerReplace, or set `scaleot_no_src: false`."
            )
        model_name = getattr(pl_module, "model_name", None)
        if isinstance(model_name, str):
            check_task(self.settings, model_name)  # a bad task file or sizes fail here, not after stage 1
        self.trainers = NestedTrainers.from_trainer(trainer, self.settings.output_dir, self.settings.progress_every)
        self._provenance = run_provenance()  # the commit the run starts from

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._resuming = trainer.ckpt_path is not None  # a resumed fit continues a killed run's distillation too

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._owner_progress.on_train_start(trainer, pl_module)

    def owner_seconds(self) -> float:
        """The model owner's fit time so far, over every run of a resumed fit (the steps after the last
        checkpoint of a killed run, which the resumed run repeats, are not counted)."""
        return self._owner_seconds_before + (time.perf_counter() - self._fit_start if self._fit_start else 0.0)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain floats and lists (loadable with ``weights_only=True``): the owner's fit seconds so far, the
        per-step curves and the steps earlier runs resumed at, so that a resumed fit reports the whole stage 1."""
        return {
            "owner_seconds": self.owner_seconds(),
            "owner_curves": {k: list(v) for k, v in self._owner_curves.items()},
            "resumed_at": list(self._resumed_at),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._owner_seconds_before = float(state_dict.get("owner_seconds", 0.0))
        self._owner_curves = {k: list(v) for k, v in state_dict.get("owner_curves", {"step": []}).items()}
        self._resumed_at = [int(s) for s in state_dict.get("resumed_at", [])]
        steps = self._owner_curves.get("step", [])
        self._resumed_at.append(int(steps[-1]) if steps else 0)  # this run resumes after the last recorded step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._owner_progress.on_train_batch_end(trainer, pl_module, *args)
        self._record_owner_step(trainer, args[0] if args else None)

    def _record_owner_step(self, trainer: pl.Trainer, outputs: Any) -> None:
        """The model owner's loss this step, and its parts when the module logs them (``train/lm`` and ``train/kd``:
        OT's emulator distillation; ``train/lm`` and ``train/imitation``: ScaleOT's stage 1 with an imitation term),
        for the report's ``stage1_curves``."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return
        values = {"loss": float(loss)}
        for name in ("lm", "kd", "imitation"):
            logged = trainer.callback_metrics.get(f"train/{name}")
            if isinstance(logged, Tensor):
                values[name] = float(logged)
        self._owner_curves["step"].append(trainer.global_step)
        for name, value in values.items():
            self._owner_curves.setdefault(name, []).append(value)

    def stage1_curves(self, trainer: pl.Trainer) -> dict[str, Any]:
        """``{"loss": {"step", "loss", [parts]}, "harmonizer_error": {"step", "<block>": [...]}}`` of this
        process's model-owner steps (the error from :class:`~privtune.callbacks.layer_replace.LayerReplace`'s
        ``error_curve`` when it ran)."""
        curves: dict[str, Any] = {}
        if self._owner_curves["step"]:
            curves["loss"] = {k: list(v) for k, v in self._owner_curves.items()}
        replace = next((cb for cb in trainer.callbacks if isinstance(cb, LayerReplace)), None)
        if replace is not None and replace.error_curve:
            rows = replace.error_curve
            blocks = sorted({k for row in rows for k in row if k != "step"}, key=int)
            curves["harmonizer_error"] = {"step": [row["step"] for row in rows]} | {
                b: [row.get(b, float("nan")) for row in rows] for b in blocks
            }
            curves["harmonizer_error_definition"] = (
                "||H_i(h_in) - h_out||^2 / ||h_out - h_in||^2 on the step's held-out batch (1.0 = layer drop)"
            )
        return curves

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        export = self._export(trainer)
        if export.plan is None or self.trainers is None:
            raise RuntimeError("OffsitePipeline: the emulator was not exported; EmulatorExport must run first.")
        owner_seconds = self.owner_seconds()
        stage1 = ScaleOTStage1.from_module(pl_module) if self.settings.alphas else None
        knobs = EmulatorKnobs(
            export.adapter_layers, export.alpha, export.beta, export.beta_mlp, export.distill_steps,
            export.distill_lr, export.distill_norm, export.replaced,
        )  # fmt: skip
        wants_batches = (stage1 is not None and export.distill_steps) or self.settings.uniform_drop_distill_steps
        batches = list(trainer.datamodule.train_dataloader()) if wants_batches else []
        self.report = OffsiteRecipe(self.settings, self.trainers, resume=self._resuming).run(
            export.output_dir,
            owner_stage_seconds={STAGE1_SECONDS: owner_seconds, "emulator export": export.seconds},
            stage1=stage1,
            knobs=knobs,
            distill_batches=batches,
            meta=self._provenance
            | _stage1_scores(pl_module)
            | ({"stage1_resumed_at_steps": list(self._resumed_at)} if self._resumed_at else {}),
            stage1_curves=self.stage1_curves(trainer),
        )


def _stage1_scores(pl_module: pl.LightningModule) -> dict[str, Any]:
    """ScaleOT's learned layer importance, ``{"layer_importance": {"<block index>": score}}``, when stage 1 ran."""
    if not conforms(pl_module, ScaleOTStage1Module) or not pl_module.harmonizers:
        return {}
    middle = sorted(int(k) for k in pl_module.harmonizers)
    scores = pl_module.layer_importance.detach().cpu().tolist()
    return {"layer_importance": {str(i): float(v) for i, v in zip(middle, scores)}}
