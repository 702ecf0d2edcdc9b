"""Offsite-tuning as a recipe: the data owner's step and the five evaluation settings, after the model owner's step.

Offsite-Tuning (arXiv 2302.04870) and ScaleOT (arXiv 2412.09812) evaluate an emulator by five settings
(docs/offsite_tuning.md §2.7): full zero-shot, emulator zero-shot, full fine-tuning of the adapter blocks,
emulator fine-tuned (the adapters tuned through the frozen emulator) and plug-in (those adapters in the original
model). :class:`OffsiteRecipe` runs all of them with the project's modules, so the numbers are comparable:

* full ZS and plug-in: :class:`~privtune.modules.TextClassifier` with ``tuning="none"`` (plug-in: the adapter
  artifact written into the adapter blocks by :func:`~privtune.emulator.plug_adapters`);
* FT: :class:`~privtune.modules.TextClassifier` with ``tuning="blocks"`` on the adapter blocks, i.e. the same
  adapter budget trained inside the full model, with the same steps and learning rate;
* emulator ZS / FT: :class:`~privtune.modules.OffsiteFinetune` on the emulator artifact; the adapter artifact is
  written by :func:`~privtune.emulator.save_adapter_artifact` from the weights of the last step (there is no
  checkpoint selection: the tuning runs without validation).

Optionally it adds Offsite-Tuning's undistilled uniform layer drop beside the exported emulator
(``uniform_drop_layers``), the same ScaleOT emulator without Selective Rank Compression (``scaleot_no_src``,
owner side only, see :func:`restore_kept_blocks`) and re-generates ScaleOT emulators of the same stage-1 run for
other ``α`` values. With ``membership_audit`` it scores every model it delivers (each arm's plug-in and full
fine-tuning of the same blocks) for membership leakage of the data owner's training split
(:mod:`privtune.recipes.offsite_membership`), reported under ``membership``.

Every nested :class:`~lightning.pytorch.Trainer` is built by :class:`NestedTrainers` from the outer Trainer's device,
precision and logger (a GPU run stays on its GPU), keeps Lightning's per-Trainer banners out of the log, and reports
its progress as plain log lines (readable in CI and ``nohup`` logs, where no progress bar renders).

Imports point one way: ``callbacks -> recipes -> modules, datamodules -> core``. Threat model: a research harness
that plays both parties in one process; the artifacts it exchanges are the folders two machines would exchange.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
import transformers
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from typing_extensions import override

from privtune.datamodules import BBCNews, TextFile, TweetsSentiment
from privtune.emulator import (
    DistillCheckpoint,
    DistillProgress,
    EmulatorPlan,
    build_scaleot_emulator,
    check_base_model,
    count_parameters,
    distill_emulator,
    load_adapter_artifact,
    load_emulator_artifact,
    plug_adapters,
    read_plan,
    save_adapter_artifact,
    save_emulator_artifact,
)
from privtune.emulator.artifact import artifact_summary
from privtune.emulator.harmonizer import LayerSwitch
from privtune.emulator.leak_check import DEFAULT_MIN_REL_ERROR, kept_matrix_closeness
from privtune.eval.offsite_report import OffsiteReport, privacy_gap
from privtune.models import get_blocks, load_model, unwrap
from privtune.modules.classifier import TextClassifier
from privtune.modules.offsite_finetune import OffsiteFinetune
from privtune.recipes.offsite_membership import PlugInAudit, best_auc, markdown_lines

FULL_FT = "full_ft"
"""Name of full fine-tuning of the adapter blocks in ``membership`` (the run's non-private reference)."""

DISTILL_CHECKPOINT_EVERY = 50
"""Steps between the saves of an in-process distillation's state (the middle, AdamW, curve: about 0.6 GB on SmolLM2)."""

PROGRESS_TAG = "privtune_progress"
"""Attribute a log record carries when it is the recipe's own progress line (kept while nested Trainers run)."""

# The loggers through which a nested Trainer announces itself ("GPU available", the logger tip, "LOCAL_RANK").
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")


def progress(message: str) -> None:
    """One plain progress line on rank zero (``[offsite] ...``), also while nested Trainers are quiet."""
    rank_zero_info(f"[offsite] {message}", extra={PROGRESS_TAG: True})


class _OnlyProgress(logging.Filter):
    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, PROGRESS_TAG, False))


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence the banners and possible-misuse hints each nested Trainer repeats; progress lines still pass."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    only_progress = _OnlyProgress()
    for log in loggers:
        log.addFilter(only_progress)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            # Lightning's own deprecation notices: the outer run has shown them once already (a fresh warnings
            # context would repeat them for every nested Trainer).
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=r"lightning\.")
            yield
    finally:
        for log in loggers:
            log.removeFilter(only_progress)


@contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """No per-load weight progress bar from transformers while the recipe loads the model again and again."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


@dataclass
class PipelineSettings:
    """The data owner's task and tuning budget, and what the report compares (validated).

    Attributes:
        output_dir: where the adapter artifacts and ``offsite_report.{json,md,png}`` go.
        task: ``tweets``, ``bbc_news`` or a CSV / TSV / JSON-lines file with ``text`` and ``label`` columns.
        train_size: training examples of the task.
        val_size: validation examples.
        test_size: test examples (all settings use the same ones).
        max_length: tokens per example.
        batch_size: training batch size.
        max_steps: adapter-tuning steps (the same on every emulator and for the full-model baseline).
        lr: adapter learning rate.
        tuning: ``full`` (all adapter weights) or ``lora`` inside the adapter blocks.
        alphas: extra ScaleOT ``α`` values, each an emulator re-generated from the same stage-1 run.
        uniform_drop_layers: ``k`` of an Offsite-Tuning 2-k-2 uniform layer drop (undistilled, built in process)
            tuned and plugged beside the exported emulator; ``None`` for none.
        uniform_drop_distill_steps: distil that uniform drop with Offsite-Tuning's objective (§2.3: ``λ_lm = 1``,
            ``λ_kd = 30``, AdamW lr ``uniform_drop_distill_lr``, the globally normalised KD term) for this many
            steps on the model owner's public LM batches before the data owner tunes it (OT with KD, arm
            ``ot_uniform_drop_2-k-2_kd<steps>``); 0 keeps it undistilled. Built and distilled in process at the model
            owner and never exported: on SmolLM2 its kept blocks stay within the leak check's 1 % after 40 and after
            100 steps, so it could not be (:func:`~privtune.emulator.save_emulator_artifact` refuses it). Its
            resumable state (the distilled middle and its batches, every :data:`DISTILL_CHECKPOINT_EVERY` steps)
            stays in the owner's ``output_dir`` until the report is written.
        uniform_drop_distill_lr: AdamW learning rate of that distillation.
        scaleot_no_src: also tune and plug the exported ScaleOT emulator with its kept middle blocks put back
            uncompressed (ablation (e), ScaleOT without SRC; same positions, harmonizers and parameter count), built
            in process at the model owner and never written (:func:`restore_kept_blocks`).
        extraction: also let the data owner fine-tune every parameter of the exported emulator (same steps, task
            and split; ``extraction_lr``) and report that accuracy (``extraction``) and the extraction gap
            ``plug-in − extraction``: the privacy audit's stronger data owner.
        extraction_lr: learning rate of the extraction run (every parameter moves, so lower than ``lr``).
        seed: seed of the task split and of the tuning runs.
        title: first line of the report.
        template: prompt of a file task (one ``{text}`` slot).
        label_words: label words of a file task, in ``label_names`` order.
        label_names: class order of a file task.
        progress_every: log a progress line every this many training steps.
        membership_audit: score every delivered model (each arm's plug-in, and full fine-tuning of the same blocks)
            with the membership attacks (:class:`~privtune.recipes.offsite_membership.PlugInAudit`) and report them
            under ``membership``.
        audit_examples: at most this many members (training split) and as many non-members (test split).
        audit_seed: seed of the member / non-member draw and of the bootstrap.
        audit_reference: score the examples with the untuned base model too (the calibrated ``reference`` attack).
    """

    output_dir: str
    task: str = "tweets"
    train_size: int = 400
    val_size: int = 64
    test_size: int = 300
    max_length: int = 64
    batch_size: int = 16
    max_steps: int = 40
    lr: float = 1e-4
    tuning: str = "full"
    alphas: list[float] = field(default_factory=list)
    uniform_drop_layers: int | None = None
    uniform_drop_distill_steps: int = 0
    uniform_drop_distill_lr: float = 1e-4
    scaleot_no_src: bool = False
    extraction: bool = False
    extraction_lr: float = 2e-5
    seed: int = 0
    title: str = ""
    template: str = "Text: {text}\nLabel:"
    label_words: list[str] | None = None
    label_names: list[str] | None = None
    progress_every: int = 10
    membership_audit: bool = False
    audit_examples: int = 128
    audit_seed: int = 0
    audit_reference: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.task not in ("tweets", "bbc_news") and not self.task.endswith((".csv", ".tsv", ".jsonl", ".json")):
            problems.append(f"`task={self.task!r}` must be 'tweets', 'bbc_news' or a .csv/.tsv/.jsonl/.json file")
        if self.task not in ("tweets", "bbc_news") and not Path(self.task).is_file():
            problems.append(f"`task={self.task!r}`: no such file (give the data owner's CSV / TSV / JSON-lines file)")
        if self.task not in ("tweets", "bbc_news") and not self.label_words:
            problems.append("a file `task` needs `label_words` (one single-token word per class)")
        if self.tuning not in ("full", "lora"):
            problems.append(f"`tuning={self.tuning!r}` must be 'full' or 'lora'")
        for name in ("train_size", "val_size", "test_size", "max_length", "batch_size", "max_steps", "progress_every"):
            if getattr(self, name) < 1:
                problems.append(f"`{name}={getattr(self, name)}` must be >= 1")
        if not self.lr > 0:
            problems.append(f"`lr={self.lr}` must be > 0")
        if not self.extraction_lr > 0:
            problems.append(f"`extraction_lr={self.extraction_lr}` must be > 0")
        bad = [a for a in self.alphas if not 0.0 <= a < 1.0]
        if bad:
            problems.append(f"`alphas={self.alphas}`: {bad} outside [0, 1)")
        if self.uniform_drop_layers is not None and self.uniform_drop_layers < 1:
            problems.append(f"`uniform_drop_layers={self.uniform_drop_layers}` must be >= 1 kept middle blocks")
        if self.uniform_drop_distill_steps < 0:
            problems.append(f"`uniform_drop_distill_steps={self.uniform_drop_distill_steps}` must be >= 0")
        if self.uniform_drop_distill_steps and self.uniform_drop_layers is None:
            problems.append(
                f"`uniform_drop_distill_steps={self.uniform_drop_distill_steps}` distils the uniform-drop arm: set "
                "`uniform_drop_layers` too"
            )
        if not self.uniform_drop_distill_lr > 0:
            problems.append(f"`uniform_drop_distill_lr={self.uniform_drop_distill_lr}` must be > 0")
        if self.audit_examples < 2:
            problems.append(f"`audit_examples={self.audit_examples}` must be >= 2 (members and non-members each)")
        if self.audit_seed < 0:
            problems.append(f"`audit_seed={self.audit_seed}` must be >= 0")
        if self.membership_audit and min(self.train_size, self.test_size) < 2:
            problems.append(
                f"`membership_audit` draws members from `train_size={self.train_size}` and non-members from "
                f"`test_size={self.test_size}` examples: each must be >= 2"
            )
        if problems:
            raise ValueError("OffsitePipeline: " + "; ".join(problems) + ".")


class StepTimer(pl.Callback):
    """Wall time of each training step (batch start to batch end, optimizer step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._t = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t)

    @property
    def mean(self) -> float:
        """Mean step time without the first (warm-up) step."""
        times = self.times[1:] or self.times
        return sum(times) / max(len(times), 1)


class StageProgress(pl.Callback):
    """Plain progress lines of one nested run: ``[offsite] <stage>: step i/N, loss x, t s`` every ``every`` steps."""

    def __init__(self, stage: str, every: int) -> None:
        self.stage, self.every = stage, every
        self._start = 0.0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        budget = f"{trainer.max_steps} steps" if trainer.max_steps > 0 else f"{trainer.max_epochs} epochs"
        progress(f"{self.stage}: {budget} on {trainer.strategy.root_device}")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        of = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        shown = f", loss {float(loss):.4f}" if isinstance(loss, Tensor) else ""
        elapsed = time.perf_counter() - self._start
        progress(f"{self.stage}: step {step}{of}{shown}, {elapsed:.1f} s")


class StageLogger(Logger):
    """Forwards one nested run's metrics to the outer run's logger under ``<stage>/``; never finalizes it."""

    def __init__(self, outer: Logger, stage: str) -> None:
        super().__init__()
        self.outer, self.stage = outer, stage

    @property
    @override
    def name(self) -> str | None:
        return self.outer.name

    @property
    @override
    def version(self) -> int | str | None:
        return self.outer.version

    @property
    @override
    def save_dir(self) -> str | None:
        return self.outer.save_dir

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.outer.log_metrics({f"{self.stage}/{k}": v for k, v in metrics.items()}, step)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The outer run logged the configuration; a nested run adds nothing."""

    @override
    def save(self) -> None:
        self.outer.save()

    @override
    def finalize(self, status: str) -> None:
        self.outer.save()  # the outer run is still going: flush, do not close


@dataclass(frozen=True)
class NestedTrainers:
    """How the recipe builds each nested Trainer: the outer run's device, precision and logger, quiet, one device.

    Attributes:
        accelerator: ``cpu``, ``cuda``, ``mps`` (from the outer Trainer's root device) or ``auto``.
        devices: the device list (``[index]`` on CUDA) or count.
        precision: Lightning precision string, e.g. ``32-true``, ``bf16-mixed``.
        logger: the outer run's logger (each stage logs under its own prefix), or ``None``.
        root_dir: ``default_root_dir`` of the nested runs.
        progress_every: a progress line every this many training steps.
    """

    accelerator: str
    devices: int | list[int]
    precision: str
    logger: Logger | None = None
    root_dir: str = "."
    progress_every: int = 10

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer, root_dir: str, progress_every: int = 10) -> NestedTrainers:
        """Nested runs on the outer ``trainer``'s root device, with its precision and logger.

        Raises:
            ValueError: if the outer run spans several processes (the nested runs use one device), or its device
                type has no single-device Lightning accelerator here.
        """
        if trainer.world_size > 1:
            raise ValueError(
                f"OffsitePipeline: the outer Trainer runs {trainer.world_size} processes, but the data owner's tuning "
                "and the evaluations run on one device. HINT: run the model owner's stage with `trainer.devices: 1`."
            )
        device = trainer.strategy.root_device
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(
                f"OffsitePipeline: the outer Trainer runs on `{device}`; nested runs support cpu, cuda and mps. "
                "HINT: set `trainer.accelerator` to one of them."
            )
        devices: int | list[int] = [device.index] if device.type == "cuda" and device.index is not None else 1
        return cls(device.type, devices, str(trainer.precision), trainer.logger, root_dir, progress_every)

    @classmethod
    def auto(cls, root_dir: str, progress_every: int = 10) -> NestedTrainers:
        """For scripts without an outer run: Lightning's accelerator choice, one device, fp32, no logger."""
        return cls("auto", 1, "32-true", None, root_dir, progress_every)

    @property
    def device(self) -> torch.device:
        """The device the nested runs use (``auto``: CUDA, else MPS, else the CPU, as Lightning chooses)."""
        kind = self.accelerator
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        if kind == "cuda":
            index = self.devices[0] if isinstance(self.devices, list) and self.devices else 0
            return torch.device("cuda", index)
        return torch.device(kind)

    def build(self, stage: str, max_steps: int = -1, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
        """A quiet Trainer for ``stage`` (its metrics logged under ``<stage>/`` in the outer logger)."""
        with quiet_lightning():
            return pl.Trainer(
                accelerator=self.accelerator,
                devices=self.devices,
                precision=self.precision,  # type: ignore[arg-type]
                max_steps=max_steps,
                max_epochs=-1 if max_steps > 0 else None,
                logger=StageLogger(self.logger, stage) if self.logger is not None else False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                log_every_n_steps=self.progress_every,
                callbacks=list(callbacks),
                default_root_dir=self.root_dir,
            )

    def fit(
        self, stage: str, module: pl.LightningModule, datamodule: pl.LightningDataModule, steps: int, seed: int
    ) -> StepTimer:
        """Train ``module`` for ``steps`` steps (seeded); returns the step timer."""
        pl.seed_everything(seed, verbose=False)
        timer = StepTimer()
        trainer = self.build(stage, steps, [timer, StageProgress(stage, self.progress_every)])
        with quiet_lightning():
            trainer.fit(module, datamodule=datamodule)
        return timer

    def test(self, stage: str, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict[str, float]:
        """Test accuracy and macro-F1 of ``module``; logs one progress line with the result."""
        start = time.perf_counter()
        with quiet_lightning():
            result = self.build(stage).test(module, datamodule=datamodule, verbose=False)[0]
        out = {"acc": float(result["test/acc"]), "f1": float(result["test/f1"])}
        seconds = time.perf_counter() - start
        progress(f"{stage}: accuracy {100 * out['acc']:.1f}%, macro-F1 {out['f1']:.3f} ({seconds:.1f} s)")
        return out


@runtime_checkable
class ScaleOTStage1Module(Protocol):
    """What a ScaleOT stage-1 module holds (e.g. :class:`~privtune.modules.HarmonizerImportance`)."""

    model: nn.Module
    model_name: str
    layer_importance: Tensor
    harmonizers: nn.ModuleDict


@dataclass
class ScaleOTStage1:
    """What ScaleOT's stage 1 leaves at the model owner: the original model, the layer scores and the harmonizers."""

    model: nn.Module
    model_name: str
    layer_importance: Tensor
    harmonizers: nn.ModuleDict

    @classmethod
    def from_module(cls, module: object) -> ScaleOTStage1:
        """Read the stage-1 state of ``module``.

        Raises:
            TypeError: naming the missing attribute when ``module`` is not a ScaleOT stage-1 module.
        """
        missing = [a for a in ("model", "model_name", "layer_importance", "harmonizers") if not hasattr(module, a)]
        if missing or not getattr(module, "harmonizers", None):
            raise TypeError(
                f"{type(module).__name__} is not a trained ScaleOT stage-1 module (missing {missing or ['harmonizers']}"
                "); an α sweep re-generates emulators from stage 1. HINT: use HarmonizerImportance with LayerReplace, "
                "or leave `alphas` empty (docs/offsite_tuning.md)."
            )
        m: ScaleOTStage1Module = module  # type: ignore[assignment]
        return cls(m.model, m.model_name, m.layer_importance, m.harmonizers)


@dataclass(frozen=True)
class EmulatorKnobs:
    """ScaleOT's emulator knobs ``(N_a, α, β)``, the MLP rank and the optional OT distillation after generation."""

    adapter_layers: int = 4
    alpha: float = 0.5
    beta: float = 0.8
    beta_mlp: float = 0.9
    distill_steps: int = 0
    distill_lr: float = 1e-4
    distill_norm: Literal["global", "per_dim", "global+per_dim"] = "global"
    replaced: Literal["importance", "uniform"] = "importance"


def generate_scaleot_emulator(
    stage1: ScaleOTStage1,
    knobs: EmulatorKnobs,
    output_dir: str,
    distill_batches: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Build, optionally distil, and export the ScaleOT emulator of ``stage1`` for ``knobs``; return its folder.

    Raises:
        ValueError: for ``distill_steps > 0`` without ``distill_batches``, or knobs the builder rejects.
    """
    if knobs.distill_steps and not distill_batches:
        raise ValueError(f"`distill_steps={knobs.distill_steps}` needs the owner's LM batches (`distill_batches`).")
    rank = next(iter(stage1.harmonizers.values())).down.out_features
    emulator, plan = build_scaleot_emulator(
        stage1.model, stage1.layer_importance.cpu(), stage1.harmonizers, knobs.adapter_layers, knobs.alpha,
        knobs.beta, knobs.beta_mlp, rank, knobs.replaced,
    )  # fmt: skip
    plan.base_model = stage1.model_name
    if knobs.distill_steps:
        device = next(stage1.model.parameters()).device
        batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in distill_batches]
        distill_emulator(
            stage1.model, emulator.to(device), plan, batches, knobs.distill_steps, knobs.distill_lr,
            kd_norm=knobs.distill_norm,
        )  # fmt: skip
        plan.info |= {"distill_steps": knobs.distill_steps, "distill_norm": knobs.distill_norm}
    save_emulator_artifact(output_dir, emulator.cpu(), plan, stage1.model.cpu())
    return output_dir


def make_datamodule(settings: PipelineSettings, model_name: str) -> pl.LightningDataModule:
    """The data owner's task datamodule (tokenizer of ``model_name``)."""
    common = {
        "train_size": settings.train_size,
        "val_size": settings.val_size,
        "test_size": settings.test_size,
        "max_length": settings.max_length,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "tokenizer": model_name,
    }
    if settings.task == "tweets":
        return TweetsSentiment(**common)
    if settings.task == "bbc_news":
        return BBCNews(**common)
    return TextFile(
        settings.task,
        template=settings.template,
        label_words=settings.label_words,
        label_names=settings.label_names,
        **common,
    )


def check_task(settings: PipelineSettings, model_name: str) -> None:
    """Read and split the data owner's task once, so that a bad file or sizes the data cannot give fail before stage 1.

    Raises:
        ValueError: naming the file or the size argument, as the datamodule words it, prefixed with the pipeline.
    """
    try:
        make_datamodule(settings, model_name).setup("fit")
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"OffsitePipeline: the data owner's task cannot be used: {err}") from err


def restore_kept_blocks(module: OffsiteFinetune, original: nn.Module) -> None:
    """Ablation (e), ScaleOT without SRC: put the original blocks back in place of the kept, compressed ones.

    In place, on ``module`` (an :class:`~privtune.modules.OffsiteFinetune` loaded from a ScaleOT emulator artifact of
    ``original``): every ``block`` position of the plan gets a frozen copy of the original block it came from, so
    the emulator is ScaleOT's with the same replaced set, the same harmonizers and the same parameter count (SRC
    stores its rank-``β`` matrices dense when factors would not be smaller), only without the rank compression.
    ``module.plan`` is a copy without the kept blocks' surgery, marked ``info["src"] = False`` and
    ``info["owner_only"] = True`` (so the adapter artifact says what it was tuned on). With ``distill_steps`` > 0 at
    export, the harmonizers are the exported ones, distilled next to the compressed blocks.

    Threat model: this emulator holds original middle matrices, so it exists only inside the model owner's own
    research process; it is never written (the emulator artifact's leak check would refuse it, and
    :class:`~privtune.callbacks.offsite_tuning.EmulatorExport` refuses ``beta = 1``). What ships is unchanged.

    Raises:
        ValueError: if ``module``'s emulator is not a ScaleOT one, or ``original`` is not its base model.
    """
    plan = module.plan
    if plan.method != "scaleot":
        raise ValueError(
            f"`scaleot_no_src` restores the kept blocks of a ScaleOT emulator, but this one is `{plan.method}`. "
            "HINT: use HarmonizerImportance with LayerReplace (docs/offsite_tuning.md, ablation (e))."
        )
    check_base_model(plan, original, what="the original model for the ScaleOT-without-SRC arm")
    originals = [b.block if isinstance(b, LayerSwitch) else b for b in get_blocks(unwrap(original))]  # stage 1's
    blocks = get_blocks(unwrap(module.model))
    kept = {pos: orig for pos, (orig, kind) in enumerate(zip(plan.layer_map, plan.kinds)) if kind == "block"}
    for pos, orig in kept.items():
        dtype = next(blocks[pos].parameters()).dtype
        blocks[pos] = copy.deepcopy(originals[orig]).to(dtype).requires_grad_(False).train(blocks[pos].training)
    surgery = {k: v for k, v in plan.modules.items() if int(k.split(".", 1)[0]) not in kept}
    info = plan.info | {"beta": 1.0, "beta_mlp": 1.0, "src": False, "owner_only": True}
    module.plan = replace(plan, modules=surgery, info=info)


def plugged_classifier(model_name: str, adapter_dir: str | Path) -> TextClassifier:
    """The original model with the adapter artifact plugged into its adapter blocks (OT plug-in), untuned.

    Raises:
        ValueError: if the artifact was trained for another base model, or its keys or shapes do not fit.
    """
    classifier = TextClassifier(model_name, tuning="none")
    adapters, plan = load_adapter_artifact(adapter_dir)
    check_base_model(plan, classifier.model, what=f"adapter artifact {adapter_dir}")
    plug_adapters(classifier.model, adapters, plan)
    return classifier


class OffsiteRecipe:
    """The data owner's tuning and the five settings on an emulator artifact, with optional comparison arms.

    Args:
        settings: task, budget and arms (:class:`PipelineSettings`).
        trainers: how nested Trainers are built (:meth:`NestedTrainers.from_trainer` inside a run).
        resume: continue an in-process distillation from the state a killed run left in ``output_dir``
            (:data:`DISTILL_CHECKPOINT_EVERY`); a fresh run (``False``) discards such a state and starts over.
    """

    def __init__(self, settings: PipelineSettings, trainers: NestedTrainers, resume: bool = False) -> None:
        self.settings = settings
        self.trainers = trainers
        self.resume = resume
        self.audit: PlugInAudit | None = None
        self.membership: dict[str, dict[str, Any]] = {}

    def start_membership_audit(self, model_name: str, datamodule: pl.LightningDataModule) -> PlugInAudit:
        """Draw the members and non-members of ``datamodule`` and score the untuned base model (with
        ``audit_reference``); from now on every delivered model is audited (:attr:`membership`)."""
        s = self.settings
        start = time.perf_counter()
        datamodule.setup("fit")  # the splits are drawn once; the nested runs reuse them
        reference = TextClassifier(model_name, tuning="none").model if s.audit_reference else None
        self.audit = PlugInAudit(
            datamodule,
            s.audit_examples,
            s.audit_seed,
            self.trainers.device,
            self.trainers.precision,
            reference_model=reference,
            tokenizer=getattr(datamodule, "tokenizer", None),
            meta={"data_owner_epochs": round(s.max_steps / math.ceil(s.train_size / s.batch_size), 3)},
        )
        n = self.audit.size
        what = "and the untuned base model scored" if reference is not None else "without a reference model"
        seconds = time.perf_counter() - start
        progress(f"membership audit: {n} members and {n} non-members drawn, {what} ({seconds:.1f} s)")
        return self.audit

    def audit_model(self, name: str, classifier: TextClassifier) -> None:
        """Membership report of ``classifier``'s model under ``name`` (nothing without a started audit)."""
        if self.audit is None:
            return
        report = self.audit.audit(classifier.model, name)
        self.membership[name] = report
        attack, auc = best_auc(report)
        progress(
            f"membership audit {name}: highest AUC {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}] "
            f"({attack}), {self.audit.size} + {self.audit.size} examples ({report['meta']['audit_seconds']:.1f} s)"
        )

    def tune_emulator_and_plug_in(
        self,
        model_name: str,
        emulator_dir: str | None,
        adapter_dir: str,
        datamodule: pl.LightningDataModule,
        emulator_layers: int | None = None,
        arm: str = "emulator",
        adapters: tuple[int, int] = (2, 2),
        original: nn.Module | None = None,
        distill_steps: int = 0,
        distill_batches: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        """Data owner: emulator ZS, adapter tuning (emulator FT); model owner: plug-in. Returns the rows and costs.

        ``emulator_dir=None`` with ``emulator_layers=k`` builds an undistilled ``adapters[0]``-k-``adapters[1]``
        uniform-drop emulator in process (Offsite-Tuning's training-free OT†, which cannot be exported as an
        artifact: it holds original blocks); with ``distill_steps`` > 0 the model owner first distils its middle
        with OT's objective on ``distill_batches`` (:meth:`distill_in_process`; the curve is returned under
        ``distillation``). With ``original``, the ScaleOT artifact's kept blocks are put back uncompressed in process
        (:func:`restore_kept_blocks`; ScaleOT without SRC, likewise never exported).
        """
        s, t = self.settings, self.trainers
        source: dict[str, Any] = {"emulator_dir": emulator_dir, "emulator_layers": emulator_layers}
        if emulator_dir is None:
            source |= {"adapter_bottom": adapters[0], "adapter_top": adapters[1]}
        out: dict[str, Any] = {}
        start = time.perf_counter()
        untuned = OffsiteFinetune(model_name, **source, tuning="none")
        if original is not None:
            restore_kept_blocks(untuned, original)
        if distill_steps:
            out["distillation"] = self.distill_in_process(untuned, distill_steps, distill_batches, arm)
            start = time.perf_counter()  # the emulator ZS below is timed on its own
        out["emulator_zs"] = t.test(f"{arm}_zero_shot", untuned, datamodule)
        out["seconds_emulator_zs"] = time.perf_counter() - start
        module = OffsiteFinetune(model_name, **source, tuning=s.tuning, lr=s.lr)  # type: ignore[arg-type]
        if original is not None:
            restore_kept_blocks(module, original)
        if distill_steps:  # the same distilled middle; the adapters are the original blocks in both
            module.model.load_state_dict(untuned.model.state_dict())
        start = time.perf_counter()
        timer = t.fit(f"{arm}_data_owner_tuning", module, datamodule, s.max_steps, s.seed)
        save_adapter_artifact(adapter_dir, module.adapter_state(), module.plan)  # the last step's adapters
        out["seconds_emulator_fit"] = time.perf_counter() - start
        out["step_emulator"] = timer.mean
        out["emulator_ft"] = t.test(f"{arm}_fine_tuned", module, datamodule)
        out["emulator_params"] = count_parameters(module.model)
        out["emulator_middle_params"] = count_parameters(module.model, module.plan)
        start = time.perf_counter()
        plugged = plugged_classifier(model_name, adapter_dir)
        out["plug_in"] = t.test(f"{arm}_plug_in", plugged, datamodule)
        out["seconds_plug_in"] = time.perf_counter() - start
        self.audit_model(arm, plugged)
        return out

    def distill_in_process(
        self, emulator: OffsiteFinetune, steps: int, batches: Sequence[Mapping[str, Any]], arm: str
    ) -> dict[str, Any]:
        """Model owner: distil ``emulator``'s middle towards the original model with Offsite-Tuning's objective.

        OT (arXiv 2302.04870, §2.3): ``λ_lm · LM + λ_kd · KD`` with λ_lm = 1, λ_kd = 30, the globally normalised KD
        term, AdamW at ``uniform_drop_distill_lr``, on the owner's public LM ``batches`` (cycled), in place and on
        the nested Trainers' device. Returns ``{"steps", "lr", "seconds", "curve": {"step", "loss", "lm", "kd"},
        "kept_closeness"}``: how far the distilled kept blocks moved from their originals
        (:func:`kept_closeness_record`; plain relative error: the export's leak check, minimising over alignments,
        gives at most about this, so below its threshold the export would refuse this emulator).
        """
        s = self.settings
        device = self.trainers.device
        teacher = load_model(emulator.plan.base_model).to(device)
        state, _ = self.distill_files(arm)
        batches = self._distill_batches(arm, batches)
        moved = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        curve: dict[str, list[float]] = {"step": [], "loss": [], "lm": [], "kd": []}
        every = max(1, steps // 10)
        earlier = DistillProgress()
        start = time.perf_counter()

        def record(step: int, values: Mapping[str, float]) -> None:
            curve["step"].append(step)
            for name in ("loss", "lm", "kd"):
                curve[name].append(values[name])
            if step % every == 0 or step == steps:
                progress(
                    f"{arm}: model owner's distillation step {step}/{steps}, LM {values['lm']:.4f}, "
                    f"KD {values['kd']:.4f}, {earlier.seconds + time.perf_counter() - start:.1f} s"
                )

        def restored(done: DistillProgress) -> None:
            nonlocal earlier
            earlier = done
            curve["step"] = list(range(1, done.step + 1))
            for name in ("loss", "lm", "kd"):
                curve[name] = list(done.history[name])
            progress(f"{arm}: model owner's distillation resumed after step {done.step}/{steps} from {state}")

        progress(f"{arm}: model owner's distillation (Offsite-Tuning's KD), {steps} steps on {device.type}")
        distill_emulator(
            teacher, emulator.model.to(device), emulator.plan, moved, steps, s.uniform_drop_distill_lr,
            on_step=record, checkpoint=DistillCheckpoint(state, DISTILL_CHECKPOINT_EVERY), on_resume=restored,
        )  # fmt: skip
        seconds = earlier.seconds + time.perf_counter() - start
        emulator.model.cpu()
        closeness = kept_closeness_record(kept_matrix_closeness(emulator.model, teacher.cpu(), emulator.plan))
        if closeness["matrices"]:
            progress(
                f"{arm}: distilled kept blocks at relative error >= {closeness['min_rel_error']:.2e} from their "
                f"originals ({closeness['below_threshold']} of {closeness['matrices']} matrices below the leak "
                f"check's {closeness['threshold']:g})"
            )
        resumed = {"resumed_at_step": earlier.step} if earlier.step else {}
        return {
            "steps": steps, "lr": s.uniform_drop_distill_lr, "seconds": seconds, "curve": curve,
            "kept_closeness": closeness,
        } | resumed  # fmt: skip

    def distill_files(self, arm: str) -> tuple[Path, Path]:
        """Where the in-process distillation of ``arm`` keeps its resumable state and the batches it runs on; both
        are removed once the report is written."""
        folder = Path(self.settings.output_dir) / "distillation_state"
        return folder / f"{arm}.pt", folder / f"{arm}.batches.pt"

    def _distill_batches(self, arm: str, batches: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The batches ``arm``'s distillation runs on: a resumed run's are the killed run's, saved when it started.

        The owner's batches are drawn from the fit's training loader where the fit loop left it, and a fit restored
        from its last checkpoint leaves it elsewhere; continuing on other batches would be another distillation,
        so the first run saves its batches and a resumed one reads them back (``weights_only=True``). A fresh run
        (not resumed) discards an earlier run's state and batches and starts over.
        """
        state, saved = self.distill_files(arm)
        if self.resume and saved.is_file():
            progress(f"{arm}: resuming the model owner's distillation on the batches of the run that started it")
            return torch.load(saved, map_location="cpu", weights_only=True)
        if state.is_file() or saved.is_file():
            progress(f"{arm}: a fresh run discards the earlier run's distillation state in {state.parent}")
            state.unlink(missing_ok=True)
        cpu = [{k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cpu, saved)
        return cpu

    def extraction(self, model_name: str, emulator_dir: str, datamodule: pl.LightningDataModule) -> dict[str, float]:
        """The extraction attacker's accuracy: the data owner fine-tunes every parameter of the shipped emulator
        (not only the adapters) on its task with the same steps and split, and uses the emulator as its model."""
        s, t = self.settings, self.trainers
        module = OffsiteFinetune(model_name, emulator_dir=emulator_dir, tuning="emulator", lr=s.extraction_lr)
        t.fit("extraction_every_emulator_parameter", module, datamodule, s.max_steps, s.seed)
        return t.test("extraction", module, datamodule)

    def full_model(
        self, model_name: str, datamodule: pl.LightningDataModule, adapter_indices: Sequence[int]
    ) -> tuple[dict[str, float], dict[str, float], StepTimer]:
        """``(full zero-shot, full fine-tuning of the adapter blocks, its step timer)``."""
        s, t = self.settings, self.trainers
        zs = t.test("full_zero_shot", TextClassifier(model_name, tuning="none"), datamodule)
        ft = TextClassifier(model_name, tuning="blocks", trainable_blocks=list(adapter_indices), lr=s.lr)
        timer = t.fit("full_fine_tuning", ft, datamodule, s.max_steps, s.seed)
        tested = t.test("full_fine_tuned", ft, datamodule)
        self.audit_model(FULL_FT, ft)
        return zs, tested, timer

    def run(
        self,
        emulator_dir: str,
        owner_stage_seconds: Mapping[str, float] | None = None,
        stage1: ScaleOTStage1 | None = None,
        knobs: EmulatorKnobs | None = None,
        distill_batches: Sequence[Mapping[str, Any]] = (),
        meta: Mapping[str, Any] | None = None,
        stage1_curves: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The five settings on ``emulator_dir``, the comparison arm and the α sweep; writes and logs the report.

        ``stage1_curves`` (the model owner's per-step loss and harmonizer errors, :func:`stage1_curve_lines`) go
        into the report as they are, under ``stage1_curves``.

        Raises:
            ValueError: for an α sweep without the stage-1 state and knobs it re-generates emulators from.
        """
        if self.settings.alphas and (stage1 is None or knobs is None):
            raise ValueError(
                f"`alphas={self.settings.alphas}` re-generate ScaleOT emulators from stage 1, but no stage-1 state was "
                "given. HINT: run the sweep after HarmonizerImportance + LayerReplace, or leave `alphas` empty."
            )
        if self.settings.uniform_drop_distill_steps and not distill_batches:
            raise ValueError(
                f"`uniform_drop_distill_steps={self.settings.uniform_drop_distill_steps}` distils the uniform drop on "
                "the model owner's LM batches, but none were given (`distill_batches`)."
            )
        with quiet_weight_loading():
            return self._run(emulator_dir, owner_stage_seconds, stage1, knobs, distill_batches, meta, stage1_curves)

    def _run(
        self,
        emulator_dir: str,
        owner_stage_seconds: Mapping[str, float] | None,
        stage1: ScaleOTStage1 | None,
        knobs: EmulatorKnobs | None,
        distill_batches: Sequence[Mapping[str, Any]],
        meta: Mapping[str, Any] | None,
        stage1_curves: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        s = self.settings
        plan = read_plan(emulator_dir)
        model_name = plan.base_model
        out_dir = Path(s.output_dir)
        datamodule = make_datamodule(s, model_name)
        stages = dict(owner_stage_seconds or {})
        rows: dict[str, dict[str, float]] = {}
        arm_name = _arm_name(plan)
        self.audit, self.membership = None, {}
        if s.membership_audit:
            start = time.perf_counter()
            self.start_membership_audit(model_name, datamodule)
            stages["membership audit: draw and reference scoring"] = time.perf_counter() - start

        start = time.perf_counter()
        rows["full_zs"], rows["ft"], ft_timer = self.full_model(model_name, datamodule, plan.split.adapter_indices)
        stages[f"full zero-shot eval + full-model tuning of the same blocks ({s.max_steps} steps)"] = (
            time.perf_counter() - start
        )
        owner = self.tune_emulator_and_plug_in(
            model_name, emulator_dir, str(out_dir / "adapters"), datamodule, arm=arm_name
        )
        rows |= {k: owner[k] for k in ("emulator_zs", "emulator_ft", "plug_in")}
        stages["emulator zero-shot eval"] = owner["seconds_emulator_zs"]
        stages[f"data owner: adapter tuning on emulator ({s.max_steps} steps)"] = owner["seconds_emulator_fit"]
        stages["plug-in eval"] = owner["seconds_plug_in"]
        if s.extraction:
            start = time.perf_counter()
            rows["extraction"] = self.extraction(model_name, emulator_dir, datamodule)
            stages[f"extraction: every emulator parameter tuned ({s.max_steps} steps)"] = time.perf_counter() - start

        full_model = load_model(model_name)
        full_params = count_parameters(full_model)
        emulator, _ = load_emulator_artifact(emulator_dir)
        emulator_params = count_parameters(emulator)
        sizes = {
            "method": plan.method,
            "layers (adapter / block / harmonizer)": "/".join(
                str(plan.kinds.count(k)) for k in ("adapter", "block", "harmonizer")
            ),
            "params": emulator_params,
            "full_params": full_params,
            "params ratio": round(emulator_params / full_params, 3),
            "middle params": count_parameters(emulator, plan),
            **plan.info,
            **_closeness_rows(emulator_dir),
        }
        arms = {arm_name: _arm_row(owner, emulator_params, full_params)}
        distillations: dict[str, Any] = {}
        if s.uniform_drop_layers is not None:
            k, steps = s.uniform_drop_layers, s.uniform_drop_distill_steps
            name = f"ot_uniform_drop_{plan.adapter_bottom}-{k}-{plan.adapter_top}" + (f"_kd{steps}" if steps else "")
            start = time.perf_counter()
            drop = self.tune_emulator_and_plug_in(
                model_name, None, str(out_dir / f"adapters_{name}"), datamodule, k, arm=name,
                adapters=(plan.adapter_bottom, plan.adapter_top), distill_steps=steps, distill_batches=distill_batches,
            )  # fmt: skip
            if steps:
                stages[f"OT uniform drop {name}: model owner's distillation ({steps} steps)"] = drop["distillation"][
                    "seconds"
                ]
                distillations[name] = drop["distillation"]
            stages[f"OT uniform drop {name}: zero-shot, tuning, plug-in"] = (
                time.perf_counter() - start - (drop["distillation"]["seconds"] if steps else 0.0)
            )
            arms[name] = _arm_row(drop, drop["emulator_params"], full_params)
        if s.scaleot_no_src:
            name = f"{arm_name}_no_src"
            start = time.perf_counter()
            no_src = self.tune_emulator_and_plug_in(
                model_name, emulator_dir, str(out_dir / f"adapters_{name}"), datamodule, arm=name, original=full_model
            )
            stages[f"{name} (owner side, not exported): zero-shot, tuning, plug-in"] = time.perf_counter() - start
            arms[name] = _arm_row(no_src, no_src["emulator_params"], full_params)

        sweep: list[dict[str, float]] = []
        if s.alphas and stage1 is not None and knobs is not None:
            sweep.append({"alpha": float(plan.info.get("alpha", float("nan")))} | _sweep_row(owner, emulator_params))
            for alpha in s.alphas:
                start = time.perf_counter()
                folder = generate_scaleot_emulator(
                    stage1, replace(knobs, alpha=alpha), f"{emulator_dir}_alpha{alpha:g}", distill_batches
                )
                res = self.tune_emulator_and_plug_in(
                    model_name, folder, str(out_dir / f"adapters_alpha{alpha:g}"), datamodule, arm=f"alpha{alpha:g}"
                )
                sweep.append({"alpha": alpha} | _sweep_row(res, res["emulator_params"]))
                stages[f"α = {alpha:g}: generation, tuning, plug-in"] = time.perf_counter() - start

        report = OffsiteReport(
            title=s.title or f"{model_name}, {s.task}: {plan.method} emulator",
            settings=rows,
            emulator=sizes,
            step_seconds={"emulator": owner["step_emulator"], "full": ft_timer.mean},
            stage_seconds=stages,
            sweep=sorted(sweep, key=lambda r: r["alpha"]),
            arms=arms,
            meta={
                "model": model_name,
                "emulator_dir": emulator_dir,
                "accelerator": self.trainers.accelerator,
                "precision": self.trainers.precision,
                **asdict(s),
                **dict(meta or {}),
            },
        )
        report.write(out_dir)
        for name in distillations:  # the report holds the result: the resumable state is no longer needed
            for path in self.distill_files(name):
                path.unlink(missing_ok=True)
        keys: dict[str, Any] = {}
        lines: list[str] = []
        if self.membership:
            keys["membership"] = self.membership
            lines += markdown_lines(self.membership)
        if stage1_curves:
            keys["stage1_curves"] = dict(stage1_curves)
            lines += stage1_curve_lines(stage1_curves)
        if distillations:  # the in-process OT + KD arm's curve: LM and KD parts per step
            keys["uniform_drop_distillation"] = distillations
            for name, record in distillations.items():
                title = f"{name}: model owner's distillation, {record['seconds']:.1f} s"
                lines += stage1_curve_lines({"loss": record["curve"]}, title)
                near = record.get("kept_closeness", {})
                if near.get("matrices"):
                    lines.append(
                        "- kept blocks after distillation: relative error to their originals "
                        f"{near['min_rel_error']:.2e} (smallest) / {near['median_rel_error']:.2e} (median); "
                        f"{near['below_threshold']} of "
                        f"{near['matrices']} matrices below the leak check's {near['threshold']:g}"
                        + (" (the export would refuse this emulator)" if near["below_threshold"] else "")
                    )
        out = report.to_dict() | keys
        markdown = report.markdown() + ("\n" + "\n".join(lines) if lines else "")
        if keys:
            _extend_report(out_dir, keys, lines)
        rank_zero_info("\n" + markdown)
        return out


def kept_closeness_record(
    closeness: Mapping[str, Mapping[str, Any]], threshold: float = DEFAULT_MIN_REL_ERROR
) -> dict[str, Any]:
    """Summary of :func:`~privtune.emulator.leak_check.kept_matrix_closeness`: the smallest and median relative
    error of the kept matrices to their originals, the largest cosine, and how many sit below the leak check's
    ``threshold`` (any one of them makes the export refuse the emulator)."""
    errors = sorted(float(c["rel_error"]) for c in closeness.values())
    if not errors:
        return {"matrices": 0, "threshold": threshold, "below_threshold": 0}
    return {
        "matrices": len(errors),
        "threshold": threshold,
        "below_threshold": sum(e < threshold for e in errors),
        "min_rel_error": errors[0],
        "median_rel_error": errors[len(errors) // 2],
        "max_cosine": max(float(c["cosine"]) for c in closeness.values()),
    }


def stage1_curve_lines(curves: Mapping[str, Any], title: str = "model owner's stage 1") -> list[str]:
    """The model owner's curves summarised for the report: each series' first and last value, with their steps.

    ``curves``: ``{"loss": {"step": [...], "<series>": [...]}, "harmonizer_error": {"step": [...], "<block>":
    [...]}}`` (each part optional; :class:`~privtune.callbacks.offsite_pipeline.OffsitePipeline` records them).
    """
    lines = ["", f"| {title} (curves in offsite_report.json) | first | last |", "|---|---|---|"]
    named = (
        ("loss", "{} (step {} → {})"),
        ("harmonizer_error", "block {} harmonizer: normalised error (step {} → {})"),
    )
    for part, label in named:
        table = curves.get(part) or {}
        steps = table.get("step") or []
        for series, values in table.items():
            if series != "step" and values:
                lines.append(f"| {label.format(series, steps[0], steps[-1])} | {values[0]:.4f} | {values[-1]:.4f} |")
    return lines


def _extend_report(folder: Path, keys: Mapping[str, Any], markdown: Sequence[str]) -> None:
    """Add ``keys`` to ``offsite_report.json`` and ``markdown`` lines to ``offsite_report.md`` (written just before)."""
    path = folder / "offsite_report.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | dict(keys), indent=2, default=str))
    md = folder / "offsite_report.md"
    md.write_text(md.read_text() + "\n".join(markdown) + "\n")


#: The report's emulator row with the kept matrices' relative error to their originals, ``"<min>–<max>"``.
KEPT_ERROR_ROW = "kept matrices: relative error to the original (min–max)"


def _closeness_rows(emulator_dir: str) -> dict[str, str]:
    """The owner's leak-check record summarised for the report: how close each kept matrix is to its original
    (relative error and cosine, min–max over matrices) and the nearest any emulator matrix came to an original."""
    closeness = artifact_summary(emulator_dir).get("closeness")
    if not closeness:
        return {}
    rows = {}
    if closeness.get("kept_rel_error_range"):
        lo, hi = closeness["kept_rel_error_range"]
        rows[KEPT_ERROR_ROW] = f"{lo:.3f}–{hi:.3f}"
    if closeness.get("kept_cosine_range"):
        lo, hi = closeness["kept_cosine_range"]
        rows["kept matrices: cosine to the original (min–max)"] = f"{lo:.3f}–{hi:.3f}"
    nearest = closeness.get("nearest")
    if nearest:
        rows["nearest any emulator matrix came to an original (relative error)"] = f"{nearest['rel_error']:.3f}"
    return rows


def _arm_name(plan: EmulatorPlan) -> str:
    name = {"scaleot": "scaleot", "uniform_drop": "ot_kd", "gradot": "gradot"}.get(plan.method, plan.method)
    return f"{name}_uniform_replaced" if plan.info.get("replaced") == "uniform" else name


def _arm_row(res: Mapping[str, Any], params: int, full_params: int) -> dict[str, float]:
    return {
        "params": params,
        "params_ratio": round(params / full_params, 3),
        "emulator_zs": res["emulator_zs"]["acc"],
        "emulator_ft": res["emulator_ft"]["acc"],
        "plug_in": res["plug_in"]["acc"],
        "gap": privacy_gap(res["plug_in"]["acc"], res["emulator_ft"]["acc"]),
    }


def _sweep_row(res: Mapping[str, Any], params: int) -> dict[str, float]:
    return {
        "emulator_params": params,
        "emulator_ft": res["emulator_ft"]["acc"],
        "plug_in": res["plug_in"]["acc"],
        "gap": privacy_gap(res["plug_in"]["acc"], res["emulator_ft"]["acc"]),
    }
