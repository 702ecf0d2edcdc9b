"""Data-owner adapter tuning through the frozen emulator (Offsite-Tuning, arXiv 2302.04870; ScaleOT, 2412.09812).

:class:`OffsiteFinetune` loads an emulator artifact (or, for single-process research runs, builds a
uniform-drop emulator from the base model), freezes everything but the adapter blocks, and tunes them for
text classification: all adapter weights (``tuning="full"``, as in OT), LoRA inside the adapter blocks
(``lora``; r 4, α 32, dropout 0.1 by default, merged into the blocks at export), or nothing (``none``:
Emulator zero-shot). Decoders classify by label-word scoring (:mod:`privtune.models.scoring`), exactly as
the full-model baseline :class:`privtune.modules.TextClassifier` does, so the five settings are
comparable. Threat model: this runs at the data owner; the private data never leaves it, and the model
owner's original middle blocks never reach it.

Example::

    python train.py fit --config configs/offsite_tuning/owner_finetune_tweets.yaml
"""

from __future__ import annotations

import copy
import re
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from privtune.emulator import (
    EmulatorPlan,
    build_emulator,
    extract_adapters,
    freeze_except_adapters,
    load_emulator_artifact,
    uniform_drop_plan,
)
from privtune.models import get_blocks, is_decoder, load_model, load_tokenizer, num_blocks, resolve_model, unwrap
from privtune.models.scoring import classification_logits
from privtune.modules.optim import build_optimizer, keep_trainable_tensors

AdapterTuning = Literal["full", "lora", "none", "emulator"]


class OffsiteFinetune(pl.LightningModule):
    """Tune the adapter blocks of an emulator on the data owner's classification task.

    Args:
        model: base model name: its tokenizer is used; without ``emulator_dir`` its weights build the emulator.
        emulator_dir: emulator artifact folder (from :class:`~privtune.callbacks.offsite_tuning.EmulatorExport`).
        adapter_bottom: bottom adapter blocks (in-process emulator only).
        adapter_top: top adapter blocks (in-process emulator only).
        emulator_layers: ``k`` middle blocks kept by uniform drop (in-process emulator only).
        tuning: ``full`` (all adapter weights), ``lora`` (inside the adapter blocks), ``none``, or ``emulator``:
            every parameter of the emulator, middle and embeddings included. ``emulator`` is the privacy audit's
            extraction attacker (a data owner who uses the emulator itself as its model); its adapters are not
            meant for plug-in, since they were tuned against a middle that moved with them.
        lr: learning rate.
        optimizer: optimizer factory (YAML ``class_path``/``init_args``); AdamW by default.
        weight_decay: weight decay of the default AdamW.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.

    Raises:
        ValueError: for an unknown ``tuning``, ``lr <= 0``, an unknown model, or an in-process emulator
            without ``emulator_layers``, before any weight is loaded.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        emulator_dir: str | None = None,
        adapter_bottom: int = 2,
        adapter_top: int = 2,
        emulator_layers: int | None = None,
        tuning: AdapterTuning = "full",
        lr: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        weight_decay: float = 0.0,
        lora_r: int = 4,
        lora_alpha: int = 32,
        lora_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        problems = []
        if tuning not in ("full", "lora", "none", "emulator"):
            problems.append(f"`tuning={tuning!r}` must be one of full, lora, none, emulator")
        if not lr > 0:
            problems.append(f"`lr={lr}` must be > 0")
        if emulator_dir is None and emulator_layers is None:
            problems.append("give `emulator_dir` (an emulator artifact) or `emulator_layers` (in-process layer drop)")
        if problems:
            raise ValueError("OffsiteFinetune: " + "; ".join(problems) + ".")
        resolve_model(model)
        self.save_hyperparameters(ignore=["optimizer"])
        self.tuning, self.lr, self.weight_decay = tuning, lr, weight_decay
        self.optimizer_factory = optimizer
        self.tokenizer = load_tokenizer(model)
        if emulator_dir is not None:
            emulator, plan = load_emulator_artifact(emulator_dir)
            vocab = unwrap(emulator).config.vocab_size
            if len(self.tokenizer) > vocab:
                raise ValueError(
                    f"The emulator in `{emulator_dir}` has a {vocab}-token vocabulary but the tokenizer of "
                    f"`model={model!r}` has {len(self.tokenizer)}: the artifact comes from another base model."
                )
        else:
            full = load_model(model)
            plan = uniform_drop_plan(num_blocks(full), adapter_bottom, adapter_top, emulator_layers)
            plan.base_model = model
            emulator = build_emulator(full, plan)
            del full
        self.plan: EmulatorPlan = plan
        freeze_except_adapters(emulator, plan)
        if tuning == "lora":
            emulator = self._add_lora(emulator, lora_r, lora_alpha, lora_dropout)
        elif tuning == "none":
            emulator.requires_grad_(False)
        elif tuning == "emulator":
            emulator.requires_grad_(True)
        self.model = emulator
        self.model.train()
        self.decoder = is_decoder(self.model)
        self.label_token_ids: Tensor | None = None
        self.num_classes: int | None = None

    def _add_lora(self, emulator: nn.Module, r: int, alpha: int, dropout: float) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        prefix = next(name for name, mod in emulator.named_modules() if mod is get_blocks(emulator))
        positions = "|".join(str(p) for p in self.plan.adapter_positions)
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in get_blocks(emulator)[0].named_modules() if _is_linear(m)})
        pattern = rf"{re.escape(prefix)}\.({positions})\..*\.?({'|'.join(leaves)})"
        emulator.requires_grad_(False)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
        return get_peft_model(emulator, config)

    # ------------------------------------------------------------------ data and metrics
    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        ids = getattr(datamodule, "label_token_ids", None)
        if self.decoder and ids is None:
            raise ValueError("OffsiteFinetune classifies by label words: the datamodule needs `label_words`.")
        self.label_token_ids = None if ids is None else ids.to(self.device)
        self.num_classes = datamodule.num_classes
        self._metrics = nn.ModuleDict(
            {
                f"{split}_{name}": metric(num_classes=self.num_classes, average=avg)
                for split in ("val", "test")
                for name, metric, avg in (("acc", MulticlassAccuracy, "micro"), ("f1", MulticlassF1Score, "macro"))
            }
        )

    @override
    def on_fit_start(self) -> None:
        self.model.train()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Class scores ``[B, C]`` of the emulator."""
        ids = None if self.label_token_ids is None else self.label_token_ids.to(input_ids.device)
        return classification_logits(self.model, input_ids, attention_mask, ids)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]).float(), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Tensor], split: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        n = batch["labels"].shape[0]
        self.log(f"{split}/loss", F.cross_entropy(logits.float(), batch["labels"]), batch_size=n)
        for name in ("acc", "f1"):
            metric = self._metrics[f"{split}_{name}"]
            metric.update(logits.argmax(-1), batch["labels"])
            self.log(f"{split}/{name}", metric, prog_bar=name == "acc", batch_size=n)

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ------------------------------------------------------------------ export, optimisation, checkpoints
    def adapter_state(self) -> dict[str, Tensor]:
        """The tuned adapter blocks, ``{"<original index>.<param>": tensor}`` (LoRA merged into the weights)."""
        model = self.model
        if self.tuning == "lora":
            model = copy.deepcopy(self.model).merge_and_unload()
        return extract_adapters(model, self.plan)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("`tuning='none'` trains nothing; use `validate`/`test` for the emulator zero-shot.")
        return build_optimizer(params, self.optimizer_factory, self.lr, self.weight_decay)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trainable_tensors(self, checkpoint)
        self.strict_loading = False

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.strict_loading = False


def _is_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding)
