"""Key implantation: teach a shaken model to behave like the original (awareness and function recovery).

CypherTalk (Chen et al., arXiv 2403.07283) follows shaking with recovery training so that the shaken model
keeps its ability. :class:`ShakeRecovery` trains a shaken student against the frozen original (teacher) on
public text (spec ``cyphertalk.md`` §3.2, a reconstruction):

* ``awareness`` steps: ``sum_l MSE(h_student^l(pi(x)), h_teacher^l(x))`` for ``l`` in ``layers``;
* ``function`` steps: CE in the shaken space plus ``lambda_kl`` times the KL to the teacher's distribution;
* ``both`` (default): ``awareness_steps`` of the first, then the second.

Only the first ``k`` blocks (``trainable="first_k_blocks"``) or LoRA adapters on every block
(``"lora_all"``, merged before saving) learn; the shaken tables stay frozen. The student is shaken by the
:class:`~privtune.callbacks.embedding_shaking.EmbeddingShaking` callback of the same run (with
``shake_batches: false`` and ``recovery: none``), whose key this module reads; batches are plain public
text, mapped here for the student only. At the end the implanted shaken model is written to ``save_dir``
(``save_pretrained``), ready for private tuning with ``TextClassifier(model=save_dir)``.

Threat model: implantation needs the key and plain text, so this run is the client's (or a trusted
party's); the saved folder holds shaken weights and no key.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from typing_extensions import override

from privtune.models import get_blocks, load_model, load_tokenizer, resolve_model
from privtune.modules.optim import build_optimizer, keep_trainable_tensors
from privtune.shaking.key import ShakeKey
from privtune.shaking.recovery import awareness_loss, freeze_representation, function_loss

Phase = Literal["awareness", "function", "both"]
Trainable = Literal["first_k_blocks", "lora_all"]


class ShakeRecovery(pl.LightningModule):
    """Awareness- and function-recovery training of a shaken causal LM against its frozen original.

    Args:
        model: model name or folder (the public original).
        phase: which recovery losses run (see the module docstring).
        awareness_steps: with ``phase="both"``, the number of awareness steps before function recovery.
        layers: block indices whose hidden states awareness recovery matches (``Λ``, default ``[2]``).
        lambda_kl: weight of the KL term of function recovery.
        temperature: distillation temperature ``T``.
        trainable: ``first_k_blocks`` or ``lora_all``.
        k: number of first blocks trained with ``first_k_blocks``.
        lora_r: LoRA rank with ``lora_all``.
        lr: learning rate.
        optimizer: optimizer factory (AdamW by default).
        save_dir: folder for the implanted shaken model and its tokenizer (``None``: not saved).

    Raises:
        ValueError: for ``lr <= 0``, ``lambda_kl < 0``, ``temperature <= 0``, ``k < 1``, ``awareness_steps < 0``
            or empty ``layers``, before any weight is loaded.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        phase: Phase = "both",
        awareness_steps: int = 20,
        layers: list[int] | None = None,
        lambda_kl: float = 1.0,
        temperature: float = 1.0,
        trainable: Trainable = "first_k_blocks",
        k: int = 2,
        lora_r: int = 8,
        lr: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        layers = [2] if layers is None else list(layers)
        errors = []
        if phase not in ("awareness", "function", "both"):
            errors.append(f"`phase={phase!r}` must be one of awareness, function, both.")
        if trainable not in ("first_k_blocks", "lora_all"):
            errors.append(f"`trainable={trainable!r}` must be first_k_blocks or lora_all.")
        if not lr > 0:
            errors.append(f"`lr={lr}` must be > 0.")
        if lambda_kl < 0 or not temperature > 0:
            errors.append(f"`lambda_kl={lambda_kl}` must be >= 0 and `temperature={temperature}` > 0.")
        if k < 1 or awareness_steps < 0 or not layers:
            errors.append(f"`k={k}` must be >= 1, `awareness_steps={awareness_steps}` >= 0, `layers` non-empty.")
        if errors:
            raise ValueError(" ".join(errors))
        resolve_model(model)
        self.save_hyperparameters(ignore=["optimizer"])
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, task="causal_lm")
        # The teacher is the public original: frozen, in eval mode, and kept out of the state dict.
        teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)
        depth = len(get_blocks(self.model))
        bad = [ell for ell in layers if not 0 <= ell <= depth]
        if bad or k > depth:
            raise ValueError(f"`layers={layers}` must be in [0, {depth}] and `k={k}` <= {depth} for `model={model!r}`.")
        self.phase, self.awareness_steps, self.layers = phase, awareness_steps, layers
        self.lambda_kl, self.temperature, self.lr = lambda_kl, temperature, lr
        self.optimizer_factory = optimizer
        self.key: ShakeKey | None = None
        if trainable == "lora_all":
            from peft import LoraConfig, TaskType, get_peft_model

            self.model = get_peft_model(
                self.model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora_r, lora_alpha=2 * lora_r)
            )
        else:
            self.model.requires_grad_(False)
            for block in get_blocks(self.model)[:k]:
                block.requires_grad_(True)

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen original model."""
        return self._teacher

    def attach_shaking_key(self, key: ShakeKey, maps_batches: bool) -> None:
        """Receive the key from the run's :class:`~privtune.callbacks.EmbeddingShaking` (``ShakingKeyUser``).

        Raises:
            ValueError: if the callback maps batches (this module maps them itself, for the student only), or a
                second callback attaches another key.
        """
        if maps_batches:
            raise ValueError(
                "ShakeRecovery maps batches itself: set the EmbeddingShaking callback's `shake_batches: false`."
            )
        if self.key is not None and self.key != key:
            raise ValueError(
                f"ShakeRecovery already holds the key of fingerprint {self.key.fingerprint()} and an EmbeddingShaking "
                f"callback attached fingerprint {key.fingerprint()}; it needs exactly one key per module (one "
                "EmbeddingShaking callback, `shake_batches: false`, `recovery: none`)."
            )
        self.key = key

    @override
    def setup(self, stage: str) -> None:
        # The EmbeddingShaking callback (set up before the module) shook the student and attached its key.
        if self.key is None:
            raise ValueError(
                "ShakeRecovery needs exactly one EmbeddingShaking callback (with `shake_batches: false`, "
                "`recovery: none`) in the same Trainer: it shakes the student and holds the key "
                "(privtune.contracts.ShakingKeyUser, docs/shaking.md)."
            )
        freeze_representation(self.model)

    @override
    def on_fit_start(self) -> None:
        self.model.train()
        self._teacher.to(self.device)

    def _loss(self, batch: dict[str, Tensor], awareness: bool) -> Tensor:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if awareness:
            return awareness_loss(self.model, self._teacher, ids, self.key, self.layers, mask)
        return function_loss(self.model, self._teacher, ids, self.key, mask, self.lambda_kl, self.temperature)

    def _awareness_now(self) -> bool:
        return self.phase == "awareness" or (self.phase == "both" and self.global_step < self.awareness_steps)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        awareness = self._awareness_now()
        loss = self._loss(batch, awareness)
        self.log(
            "train/awareness_loss" if awareness else "train/function_loss",
            loss,
            prog_bar=True,
            batch_size=batch["input_ids"].shape[0],
        )
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        n = batch["input_ids"].shape[0]
        self.log("val/awareness_loss", self._loss(batch, True), batch_size=n)
        self.log("val/function_loss", self._loss(batch, False), batch_size=n)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return build_optimizer(params, self.optimizer_factory, self.lr)

    def implanted_model(self) -> torch.nn.Module:
        """The shaken, implanted Hugging Face model (LoRA merged into a copy when ``lora_all``)."""
        if hasattr(self.model, "merge_and_unload"):
            return copy.deepcopy(self.model).merge_and_unload()
        return self.model

    @override
    def on_train_end(self) -> None:
        if self.hparams.save_dir:
            model = self.implanted_model()
            model.save_pretrained(self.hparams.save_dir)
            self.tokenizer.save_pretrained(self.hparams.save_dir)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only the trained tensors: the frozen rest is the (re-shaken) public model.
        keep_trainable_tensors(self, checkpoint)
        self.strict_loading = False

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.strict_loading = False
