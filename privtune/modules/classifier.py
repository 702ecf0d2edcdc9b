"""The baseline every privacy method is compared against: tuning a model on the task, in the clear ("FT").

:class:`TextClassifier` wraps a Hugging Face model and tunes it in one of four ways:

* ``full``: every weight;
* ``lora``: peft LoRA adapters (the classification head stays trainable on encoders);
* ``prompt``: peft prompt tuning (soft virtual tokens prepended to the input);
* ``blocks``: only the transformer blocks listed in ``trainable_blocks`` (the adapter budget of
  offsite-tuning, tuned inside the full model);
* ``none``: nothing trainable, for zero-shot ``validate`` / ``test``.

Decoders classify by label-word scoring (:mod:`privtune.models.scoring`), encoders with a classification
head. Threat model: none; this module sees the data and the model in the clear and is the utility
reference of the privacy methods.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from tqdm.auto import tqdm
from typing_extensions import override

from privtune.models import get_blocks, is_decoder, load_model, load_tokenizer, num_blocks, resolve_model
from privtune.models.loading import check_length_fits
from privtune.models.scoring import classification_logits
from privtune.modules.optim import build_optimizer, keep_trainable_tensors

Tuning = Literal["full", "lora", "prompt", "blocks", "none"]


class TextClassifier(pl.LightningModule):
    """Tune a language model for text classification.

    Args:
        model: model name or folder (see :func:`privtune.models.resolve_model`).
        tuning: what is trained (see the module docstring).
        lr: learning rate of every parameter group (``optimizer`` picks the algorithm and its other args).
        optimizer: optimizer factory, from YAML as ``class_path`` / ``init_args``; AdamW by default.
        weight_decay: weight decay for the default AdamW.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
        lora_target_modules: module names LoRA adapts (peft's per-architecture default when ``None``).
        num_virtual_tokens: soft-prompt length for ``tuning="prompt"``.
        trainable_blocks: block indices trained for ``tuning="blocks"`` (negative indices count from the top).
        num_labels: classes of an encoder's head (decoders score label words and ignore it).
        checkpoint_trainable_only: write only trainable tensors into checkpoints (the frozen rest is
            reloaded from ``model``), which keeps LoRA / prompt checkpoints small.

    Raises:
        ValueError: for an unknown model, ``lr <= 0``, ``lora_r < 1``, ``num_virtual_tokens < 1`` or block
            indices outside the model, all before any weight is loaded; at setup, for a datamodule
            ``max_length`` (plus the soft prompt) beyond the model's positions.

    Example::

        python train.py fit --config configs/baseline/smollm2_tweets_lora.yaml --model.init_args.lr=5e-4
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        tuning: Tuning = "lora",
        lr: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        weight_decay: float = 0.0,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        num_virtual_tokens: int = 16,
        trainable_blocks: list[int] | None = None,
        num_labels: int | None = None,
        checkpoint_trainable_only: bool = True,
    ) -> None:
        super().__init__()
        errors = []
        if tuning not in ("full", "lora", "prompt", "blocks", "none"):
            errors.append(f"`tuning={tuning!r}` must be one of full, lora, prompt, blocks, none.")
        if not lr > 0:
            errors.append(f"`lr={lr}` must be > 0.")
        if lora_r < 1:
            errors.append(f"`lora_r={lora_r}` must be >= 1.")
        if num_virtual_tokens < 1:
            errors.append(f"`num_virtual_tokens={num_virtual_tokens}` must be >= 1.")
        if tuning == "blocks" and not trainable_blocks:
            errors.append("`tuning='blocks'` needs `trainable_blocks`, e.g. [0, 1, -2, -1].")
        if errors:
            raise ValueError(" ".join(errors))
        resolve_model(model)  # fails fast on an unknown name, before any weight is read
        self.save_hyperparameters(ignore=["optimizer"])
        self.tuning = tuning
        self.lr = lr
        self.optimizer_factory = optimizer
        self.weight_decay = weight_decay
        self.checkpoint_trainable_only = checkpoint_trainable_only
        self.tokenizer = load_tokenizer(model)
        probe_task = "causal_lm" if _is_decoder_name(model) else "sequence_classification"
        if probe_task == "sequence_classification" and num_labels is None:
            raise ValueError(f"`num_labels` is required for the encoder `model={model!r}` (its classification head).")
        self.model = load_model(model, task=probe_task, num_labels=num_labels)
        self.decoder = is_decoder(self.model)
        self._configure_trainable(
            lora_r, lora_alpha, lora_dropout, lora_target_modules, num_virtual_tokens, trainable_blocks
        )
        self.label_token_ids: Tensor | None = None
        self.num_classes: int | None = num_labels

    # ------------------------------------------------------------------ set-up
    def _configure_trainable(
        self,
        lora_r: int,
        lora_alpha: int,
        lora_dropout: float,
        lora_target_modules: list[str] | None,
        num_virtual_tokens: int,
        trainable_blocks: list[int] | None,
    ) -> None:
        from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        task_type = TaskType.CAUSAL_LM if self.decoder else TaskType.SEQ_CLS
        if self.tuning == "lora":
            config = LoraConfig(
                task_type=task_type,
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=lora_target_modules,
            )
            self.model = get_peft_model(self.model, config)
        elif self.tuning == "prompt":
            config = PromptTuningConfig(
                task_type=task_type, num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=PromptTuningInit.RANDOM
            )
            self.model = get_peft_model(self.model, config)
        elif self.tuning in ("blocks", "none"):
            self.model.requires_grad_(False)
            if self.tuning == "blocks":
                depth = num_blocks(self.model)
                bad = [i for i in trainable_blocks or [] if not -depth <= i < depth]
                if bad:
                    raise ValueError(f"`trainable_blocks={trainable_blocks}` has {bad} outside a {depth}-block model.")
                blocks = get_blocks(self.model)
                for i in trainable_blocks or []:
                    blocks[i].requires_grad_(True)
            if not self.decoder:  # an encoder's fresh head must learn in every mode that trains
                head = getattr(self.model, "classifier", None)
                if head is not None and self.tuning != "none":
                    head.requires_grad_(True)
        self.model.train()

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        length = getattr(datamodule, "max_length", None)
        if isinstance(length, int):  # soft prompts take positions too
            extra = self.hparams.num_virtual_tokens if self.tuning == "prompt" else 0
            check_length_fits(self, length, "max_length", extra=extra)
        classes = getattr(datamodule, "num_classes", 0)
        if self.decoder:
            ids = getattr(datamodule, "label_token_ids", None)
            if ids is None:
                raise ValueError(
                    f"The decoder `model={self.hparams.model!r}` classifies by label words: give the datamodule "
                    "`label_words` (one single-token word per class)."
                )
            self.label_token_ids = ids.to(self.device)
        elif self.num_classes is not None and classes and classes != self.num_classes:
            raise ValueError(f"`num_labels={self.num_classes}` but the datamodule has {classes} classes.")
        self.num_classes = classes or self.num_classes
        self._metrics = torch.nn.ModuleDict(
            {
                f"{split}_{name}": metric(num_classes=self.num_classes, average=avg)
                for split in ("val", "test")
                for name, metric, avg in (("acc", MulticlassAccuracy, "micro"), ("f1", MulticlassF1Score, "macro"))
            }
        )

    @override
    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained starts in eval mode; dropout must be on while training

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Class scores ``[B, C]``."""
        ids = self.label_token_ids.to(input_ids.device) if self.label_token_ids is not None else None
        return classification_logits(self.model, input_ids, attention_mask, ids)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Tensor], split: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        preds = logits.argmax(-1)
        n = batch["labels"].shape[0]
        for name in ("acc", "f1"):
            metric = self._metrics[f"{split}_{name}"]
            metric.update(preds, batch["labels"])
            self.log(f"{split}/{name}", metric, prog_bar=name == "acc", batch_size=n)
        self.log(f"{split}/loss", loss, batch_size=n)

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @torch.no_grad()
    def evaluate(self, dataloader: Any, desc: str = "evaluate") -> dict[str, float]:
        """Accuracy and macro-F1 over ``dataloader`` outside the Trainer loops (used by report callbacks)."""
        was_training = self.model.training
        self.model.eval()
        acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro").to(self.device)
        f1 = MulticlassF1Score(num_classes=self.num_classes, average="macro").to(self.device)
        for batch in tqdm(dataloader, desc=desc, leave=False):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            preds = self(batch["input_ids"], batch["attention_mask"]).argmax(-1)
            acc.update(preds, batch["labels"])
            f1.update(preds, batch["labels"])
        self.model.train(was_training)
        return {"acc": acc.compute().item(), "f1": f1.compute().item(), "n": int(acc.tp.sum() + acc.fn.sum())}

    # ------------------------------------------------------------------ optimisation and checkpoints
    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"`tuning={self.tuning!r}` leaves nothing to train; use `validate`/`test` for zero-shot.")
        return build_optimizer(params, self.optimizer_factory, self.lr, self.weight_decay)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_trainable_only and self.tuning != "full":
            keep_trainable_tensors(self, checkpoint)
            self.strict_loading = False  # the frozen rest comes from `model` when the module is rebuilt

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_trainable_only and self.tuning != "full":
            self.strict_loading = False


def _is_decoder_name(model: str) -> bool:
    from privtune.models import load_config

    return load_config(model).model_type not in ("bert", "roberta")
