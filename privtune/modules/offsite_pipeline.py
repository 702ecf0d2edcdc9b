"""The data owner's step and the five evaluation settings, run in one process after the model owner's step.

Used by :class:`~privtune.callbacks.offsite_tuning.OffsitePipeline` (one config runs the whole pipeline) and
by the benchmarks. Every setting reuses the project's parts, so the numbers are comparable:

* Full ZS and plug-in: :class:`~privtune.modules.TextClassifier` with ``tuning="none"`` (plug-in: after
  :class:`~privtune.callbacks.offsite_tuning.PlugAdapters`).
* FT: :class:`~privtune.modules.TextClassifier` with ``tuning="blocks"`` on the adapter blocks, i.e. the
  same adapter budget trained inside the full model, same steps and learning rate.
* Emulator ZS / FT: :class:`~privtune.modules.offsite_finetune.OffsiteFinetune` on the emulator artifact,
  exported with :class:`~privtune.callbacks.offsite_tuning.AdapterExport`.

Classification accuracy is label-word scoring on the same test split for all five. Threat model: a
research harness that plays both parties in one process; the artifacts it exchanges are the same folders
two machines would exchange.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from privtune.emulator import count_parameters, load_emulator_artifact, read_plan
from privtune.eval.offsite_report import OffsiteReport, privacy_gap


@dataclass
class PipelineSettings:
    """The data owner's task and tuning budget (validated)."""

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
    seed: int = 0
    title: str = ""
    template: str = "Text: {text}\nLabel:"
    label_words: list[str] | None = None
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.task not in ("tweets", "bbc_news") and not self.task.endswith((".csv", ".tsv", ".jsonl", ".json")):
            problems.append(f"`task={self.task!r}` must be 'tweets', 'bbc_news' or a .csv/.tsv/.jsonl/.json file")
        if self.task not in ("tweets", "bbc_news") and not self.label_words:
            problems.append("a file `task` needs `label_words` (one single-token word per class)")
        if self.tuning not in ("full", "lora"):
            problems.append(f"`tuning={self.tuning!r}` must be 'full' or 'lora'")
        for name in ("train_size", "val_size", "test_size", "max_length", "batch_size", "max_steps"):
            if getattr(self, name) < 1:
                problems.append(f"`{name}={getattr(self, name)}` must be >= 1")
        if not self.lr > 0:
            problems.append(f"`lr={self.lr}` must be > 0")
        bad = [a for a in self.alphas if not 0.0 <= a < 1.0]
        if bad:
            problems.append(f"`alphas={self.alphas}`: {bad} outside [0, 1)")
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


def make_datamodule(settings: PipelineSettings, model_name: str) -> pl.LightningDataModule:
    """The data owner's task datamodule (tokenizer of ``model_name``)."""
    from privtune.datamodules import BBCNews, TextFile, TweetsSentiment

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


def _trainer(root: str, max_steps: int = -1, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1 if max_steps > 0 else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
        default_root_dir=root,
    )


def _test(
    module: pl.LightningModule, datamodule: pl.LightningDataModule, root: str, callbacks: list | None = None
) -> dict[str, float]:
    result = _trainer(root, callbacks=callbacks).test(module, datamodule=datamodule, verbose=False)[0]
    return {"acc": float(result["test/acc"]), "f1": float(result["test/f1"])}


def _fit(
    module: pl.LightningModule, datamodule: pl.LightningDataModule, root: str, steps: int, seed: int, callbacks: list
) -> StepTimer:
    pl.seed_everything(seed, verbose=False)
    timer = StepTimer()
    _trainer(root, steps, [timer, *callbacks]).fit(module, datamodule=datamodule)
    return timer


def tune_emulator_and_plug_in(
    settings: PipelineSettings,
    model_name: str,
    emulator_dir: str | None,
    adapter_dir: str,
    datamodule: pl.LightningDataModule,
    emulator_layers: int | None = None,
) -> dict[str, Any]:
    """Data owner: emulator ZS, adapter tuning (emulator FT); model owner: plug-in. Returns the rows and costs.

    ``emulator_dir=None`` with ``emulator_layers=k`` builds an undistilled 2-k-2 uniform-drop emulator in process
    (Offsite-Tuning's training-free OT†, which cannot be exported as an artifact: it holds original blocks).
    """
    from privtune.callbacks.offsite_tuning import AdapterExport, PlugAdapters
    from privtune.modules.classifier import TextClassifier
    from privtune.modules.offsite_finetune import OffsiteFinetune

    root = settings.output_dir
    out: dict[str, Any] = {}
    start = time.perf_counter()
    source = {"emulator_dir": emulator_dir, "emulator_layers": emulator_layers}
    out["emulator_zs"] = _test(OffsiteFinetune(model_name, **source, tuning="none"), datamodule, root)
    out["seconds_emulator_zs"] = time.perf_counter() - start
    module = OffsiteFinetune(model_name, **source, tuning=settings.tuning, lr=settings.lr)  # type: ignore[arg-type]
    start = time.perf_counter()
    timer = _fit(module, datamodule, root, settings.max_steps, settings.seed, [AdapterExport(adapter_dir)])
    out["seconds_emulator_fit"] = time.perf_counter() - start
    out["step_emulator"] = timer.mean
    out["emulator_ft"] = _test(module, datamodule, root)
    out["emulator_params"] = count_parameters(module.model)
    out["emulator_middle_params"] = count_parameters(module.model, module.plan)
    start = time.perf_counter()
    out["plug_in"] = _test(TextClassifier(model_name, tuning="none"), datamodule, root, [PlugAdapters(adapter_dir)])
    out["seconds_plug_in"] = time.perf_counter() - start
    return out


def run_data_owner_and_evaluation(
    settings: PipelineSettings,
    model_name: str,
    emulator_dir: str,
    owner_stage_seconds: dict[str, float] | None = None,
    regenerate: Callable[[float], str] | None = None,
) -> dict[str, Any]:
    """The five settings on ``emulator_dir`` (+ an optional α sweep); writes and logs the report."""
    from privtune.models import load_model
    from privtune.modules.classifier import TextClassifier

    out_dir = Path(settings.output_dir)
    datamodule = make_datamodule(settings, model_name)
    plan = read_plan(emulator_dir)
    stages = dict(owner_stage_seconds or {})
    rows: dict[str, dict[str, float]] = {}

    start = time.perf_counter()
    rows["full_zs"] = _test(TextClassifier(model_name, tuning="none"), datamodule, str(out_dir))
    stages["full zero-shot eval"] = time.perf_counter() - start

    owner = tune_emulator_and_plug_in(settings, model_name, emulator_dir, str(out_dir / "adapters"), datamodule)
    rows |= {k: owner[k] for k in ("emulator_zs", "emulator_ft", "plug_in")}
    stages["emulator zero-shot eval"] = owner["seconds_emulator_zs"]
    stages[f"data owner: adapter tuning on emulator ({settings.max_steps} steps)"] = owner["seconds_emulator_fit"]
    stages["plug-in eval"] = owner["seconds_plug_in"]

    ft = TextClassifier(model_name, tuning="blocks", trainable_blocks=plan.split.adapter_indices, lr=settings.lr)
    start = time.perf_counter()
    ft_timer = _fit(ft, datamodule, str(out_dir), settings.max_steps, settings.seed, [])
    stages[f"full-model tuning of the same blocks ({settings.max_steps} steps)"] = time.perf_counter() - start
    rows["ft"] = _test(ft, datamodule, str(out_dir))

    emulator, _ = load_emulator_artifact(emulator_dir)
    full_params = count_parameters(load_model(model_name))
    sizes = {
        "method": plan.method,
        "layers (adapter / block / harmonizer)": "/".join(
            str(plan.kinds.count(k)) for k in ("adapter", "block", "harmonizer")
        ),
        "params": count_parameters(emulator),
        "full_params": full_params,
        "params ratio": round(count_parameters(emulator) / full_params, 3),
        "middle params": count_parameters(emulator, plan),
        **plan.info,
    }
    sweep = (
        [
            {
                "alpha": float(plan.info.get("alpha", float("nan"))),
                "emulator_params": count_parameters(emulator),
                "emulator_ft": rows["emulator_ft"]["acc"],
                "plug_in": rows["plug_in"]["acc"],
                "gap": privacy_gap(rows["plug_in"]["acc"], rows["emulator_ft"]["acc"]),
            }
        ]
        if settings.alphas
        else []
    )
    for alpha in settings.alphas:
        folder = regenerate(alpha) if regenerate is not None else None
        if folder is None:
            break
        res = tune_emulator_and_plug_in(
            settings, model_name, folder, str(out_dir / f"adapters_alpha{alpha:g}"), datamodule
        )
        emu, _ = load_emulator_artifact(folder)
        sweep.append(
            {
                "alpha": alpha,
                "emulator_params": count_parameters(emu),
                "emulator_ft": res["emulator_ft"]["acc"],
                "plug_in": res["plug_in"]["acc"],
                "gap": privacy_gap(res["plug_in"]["acc"], res["emulator_ft"]["acc"]),
            }
        )
    report = OffsiteReport(
        title=settings.title or f"{model_name}, {settings.task}: {plan.method} emulator",
        settings=rows,
        emulator=sizes,
        step_seconds={"emulator": owner["step_emulator"], "full": ft_timer.mean},
        stage_seconds=stages,
        sweep=sorted(sweep, key=lambda r: r["alpha"]),
        meta={"model": model_name, "emulator_dir": emulator_dir, **settings.__dict__},
    )
    report.write(out_dir)
    rank_zero_info("\n" + report.markdown())
    return report.to_dict()
