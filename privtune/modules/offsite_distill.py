"""Model-owner emulator construction with optional distillation: Offsite-Tuning (2302.04870) and GradOT (2507.04455).

:class:`EmulatorDistillation` builds the emulator of a base model — uniform layer drop (``l-k-r``) or
GradOT (uniform drop to ``k`` blocks, then gradient-preserving rank and channel compression on
calibration batches from the datamodule) — and trains only its middle blocks with Offsite-Tuning's
objective ``λ_lm · CE + λ_kd · normalised KD`` on public text (:mod:`privtune.emulator.distill`). With
``trainer.max_steps=0`` it is training-free (OT†, or plain GradOT). The
:class:`~privtune.callbacks.offsite_tuning.EmulatorExport` callback writes the artifact at fit end.
Validation logs the emulator's LM loss and perplexity (``val/loss``, ``val/ppl``). Threat model: model
owner only; the data owner later receives the exported emulator, never the teacher.

A distilled uniform drop keeps the original kept blocks plus many small AdamW steps: at OT's learning rate
(1e-4) on SmolLM2 they stay within the leak check's 1 % of the originals after 40 and after 100 steps, and the export
refuses them at fit end; after 1000 steps of 2-13-2 the nearest was at 1.3 % (one seed, plain relative error), just
past it. How far they will move is known only once trained, so the refusal cannot come before the steps.
Offsite-Tuning with KD is measured at the model owner instead, in process and never written
(``OffsitePipeline(uniform_drop_layers=k, uniform_drop_distill_steps=N)``, which records that distance).

Example (GradOT: its compression moves every kept matrix away from the original)::

    python train.py fit --config configs/offsite_tuning/gradot_smollm2.yaml
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from typing_extensions import override

from privtune.emulator import (
    build_emulator,
    build_gradot_emulator,
    distillation_loss,
    lm_loss,
    middle_parameters,
    uniform_drop_plan,
)
from privtune.emulator.distill import KDNorm
from privtune.models import load_model, load_tokenizer, num_blocks, resolve_model
from privtune.modules.optim import build_optimizer

Method = Literal["uniform_drop", "gradot"]


class EmulatorDistillation(pl.LightningModule):
    """Build an emulator (uniform drop or GradOT) and distil its middle blocks from the original ones.

    Args:
        model: base model name or folder.
        adapter_bottom: bottom adapter blocks ``l``.
        adapter_top: top adapter blocks ``r``.
        emulator_layers: ``k`` middle blocks kept by uniform drop (GradOT: ``None`` keeps every middle block).
        method: ``uniform_drop`` or ``gradot``.
        rank_budget: GradOT kept fraction of the attention ranks.
        channel_budget: GradOT kept fraction of the MLP channels.
        lambda_attn: GradOT ``λ`` of the attention scores.
        lambda_mlp: GradOT ``λ`` of the channel scores.
        keep_top_frac: GradOT fraction of the largest singular values always kept.
        calib_batches: GradOT calibration batches taken from the training loader.
        lm_weight: ``λ_lm``.
        kd_weight: ``λ_kd``.
        kd_norm: ``global`` (Offsite-Tuning), ``per_dim`` or ``global+per_dim``; see
            :func:`~privtune.emulator.distill.normalized_kd_loss`.
        lr: learning rate of the emulator blocks.
        optimizer: optimizer factory (YAML); AdamW by default.
        weight_decay: weight decay of the default AdamW.

    Raises:
        ValueError: for an unknown method, a bad split or ``emulator_layers``, or ``lr <= 0``, before training.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        adapter_bottom: int = 2,
        adapter_top: int = 2,
        emulator_layers: int | None = 8,
        method: Method = "uniform_drop",
        rank_budget: float = 0.5,
        channel_budget: float = 0.5,
        lambda_attn: float = 1.0,
        lambda_mlp: float = 1.0,
        keep_top_frac: float = 0.05,
        calib_batches: int = 4,
        lm_weight: float = 1.0,
        kd_weight: float = 30.0,
        kd_norm: KDNorm = "global",
        lr: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if method not in ("uniform_drop", "gradot"):
            raise ValueError(f"`method={method!r}` must be 'uniform_drop' or 'gradot'.")
        if not lr > 0:
            raise ValueError(f"`lr={lr}` must be > 0.")
        if method == "uniform_drop" and emulator_layers is None:
            raise ValueError("`emulator_layers` is required for `method='uniform_drop'`.")
        if calib_batches < 1:
            raise ValueError(f"`calib_batches={calib_batches}` must be >= 1.")
        if kd_norm not in ("global", "per_dim", "global+per_dim"):
            raise ValueError(f"`kd_norm={kd_norm!r}` must be 'global', 'per_dim' or 'global+per_dim'.")
        resolve_model(model)
        self.save_hyperparameters(ignore=["optimizer"])
        self.model_name = model
        self.method = method
        self.lr, self.weight_decay, self.optimizer_factory = lr, weight_decay, optimizer
        self.lm_weight, self.kd_weight, self.kd_norm = lm_weight, kd_weight, kd_norm
        self.tokenizer = load_tokenizer(model)
        teacher = load_model(model).eval()
        teacher.requires_grad_(False)
        self.teacher = [teacher]  # a list keeps the teacher out of the module tree (not saved, not optimised)
        depth = num_blocks(teacher)
        middle = depth - adapter_bottom - adapter_top
        self.plan = uniform_drop_plan(depth, adapter_bottom, adapter_top, emulator_layers or middle)  # validates
        self.plan.base_model = model
        self.emulator = build_emulator(teacher, self.plan) if method == "uniform_drop" else None

    @property
    def original(self) -> torch.nn.Module:
        """The frozen original model (the teacher)."""
        return self.teacher[0]

    @override
    def setup(self, stage: str) -> None:
        if self.emulator is None:  # GradOT needs calibration batches from the datamodule
            hp = self.hparams
            loader = self.trainer.datamodule.train_dataloader()
            batches = [b for _, b in zip(range(hp.calib_batches), loader)]
            self.emulator, self.plan = build_gradot_emulator(
                self.original,
                batches,
                hp.adapter_bottom,
                hp.adapter_top,
                hp.emulator_layers,
                hp.rank_budget,
                hp.channel_budget,
                hp.lambda_attn,
                hp.lambda_mlp,
                hp.keep_top_frac,
            )
            self.plan.base_model = self.model_name
        middle_parameters(self.emulator, self.plan)
        self.original.to(self.device)

    @override
    def on_fit_start(self) -> None:
        self.original.to(self.device)
        self.emulator.train()

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = distillation_loss(
            self.original, self.emulator, self.plan, batch["input_ids"], batch["attention_mask"], batch["labels"],
            self.lm_weight, self.kd_weight, self.kd_norm,
        )  # fmt: skip
        n = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        self.log("train/lm", out["lm"], batch_size=n)
        self.log("train/kd", out["kd"], batch_size=n)
        return out["loss"]

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = lm_loss(self.emulator, batch)
        n = batch["input_ids"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log("val/ppl", math.exp(min(float(loss), 50.0)), batch_size=n)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.emulator.parameters() if p.requires_grad]
        return build_optimizer(params, self.optimizer_factory, self.lr, self.weight_decay)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["emulator_plan"] = self.plan.to_dict()
