"""ScaleOT stage 1 as a LightningModule: train harmonizers with a causal-LM loss (arXiv 2412.09812).

:class:`HarmonizerImportance` holds the frozen original model and an (initially empty) ``harmonizers``
``ModuleDict``; the :class:`~privtune.callbacks.layer_replace.LayerReplace` callback fills it at setup, swaps
layers in and out every step (Dynamic LayerReplace) and runs the reinforcement-learning update of the layer
importance scores, which it mirrors into the ``layer_importance`` buffer. Only the harmonizers receive
gradients. Threat model: run by the model owner on public text; nothing here reaches the data owner
except, later, the emulator generated from the scores and harmonizers.

Checkpoints hold only the harmonizers and the scores (the frozen base is reloaded from ``model``).

Example::

    python train.py fit --config configs/offsite_tuning/scaleot_stage1_smollm2.yaml
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from privtune.emulator import lm_loss
from privtune.emulator.harmonizer import LayerSwitch, _block_io, block_errors, set_replace_mask
from privtune.models import get_blocks, load_model, load_tokenizer, resolve_model, unwrap
from privtune.modules.optim import build_optimizer


@torch.no_grad()
def harmonizer_errors(
    model: nn.Module, switches: Mapping[int, LayerSwitch], batch: Mapping[str, Tensor]
) -> dict[int, float]:
    """Each harmonizer's normalised error against the block it stands for, on ``batch``'s real block inputs.

    ``||H_i(h_in) - h_out||^2 / ||h_out - h_in||^2`` over the batch's real tokens (``h_in``, ``h_out``: block
    ``i``'s input and output in one forward of the original model): the definition
    :func:`~privtune.emulator.warm_start_harmonizers` minimises, so ``1.0`` is a plain layer drop (an identity
    harmonizer) and ``0`` the block itself. ScaleOT (arXiv 2412.09812) asks for it per block through stage 1 as a
    diagnostic. Leaves every switch on its block (as after :func:`~privtune.emulator.set_replace_mask` with ``{}``).
    """
    was_training = model.training
    model.eval()  # no dropout in the measurement (and no draw from the global RNG the training run uses)
    try:
        io = _block_io(model, switches, batch)
    finally:
        model.train(was_training)
    return {idx: float(error) for idx, error in block_errors(switches, io, batch["attention_mask"]).items()}


class HarmonizerImportance(pl.LightningModule):
    """Model owner, ScaleOT stage 1: harmonizer training under Dynamic LayerReplace.

    Args:
        model: base model name or folder (:func:`privtune.models.resolve_model`); a causal decoder.
        lr: harmonizer learning rate.
        optimizer: optimizer factory (YAML ``class_path``/``init_args``); AdamW by default.
        weight_decay: weight decay of the default AdamW.
        imitation_weight: ``λ_im`` of an imitation term beside the LM loss (0 = off, the paper's LM-only stage 1):
            ``L = CE(M[m]) + λ_im · mean_i ||H_i(h_in) - h_out||^2 / ||h_out - h_in||^2`` over every harmonizer,
            with each block's input and output from one extra forward of the original model on the same batch
            (:func:`~privtune.emulator.harmonizer.block_errors`, the warm start's objective). Decision, not in
            ScaleOT (arXiv 2412.09812, which avoids a teacher-student term): under the LM-only loss the
            harmonizers drift away from their blocks (docs/offsite_tuning.md "Stage 1 through training"); the
            term keeps each one anchored to the block it stands for while the LM loss tunes it in context.

    Raises:
        ValueError: for an unknown model, ``lr <= 0`` or ``imitation_weight < 0``, before any weight is loaded.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        lr: float = 1e-3,
        optimizer: OptimizerCallable | None = None,
        weight_decay: float = 0.0,
        imitation_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"`lr={lr}` must be > 0.")
        if not imitation_weight >= 0:
            raise ValueError(f"`imitation_weight={imitation_weight}` must be >= 0 (0: LM loss only, as published).")
        resolve_model(model)
        self.save_hyperparameters(ignore=["optimizer"])
        self.model_name = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.imitation_weight = imitation_weight
        self.optimizer_factory = optimizer
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model)
        self.model.requires_grad_(False)
        self.harmonizers = nn.ModuleDict()  # "<original block index>" -> Harmonizer, filled by LayerReplace
        self.register_buffer("layer_importance", torch.zeros(0, dtype=torch.float64))
        self.strict_loading = False

    def trains_harmonizers(self) -> bool:
        """Whether any harmonizer takes gradients (False for ``LayerReplace(stand_ins='identity')``)."""
        return any(p.requires_grad for p in self.harmonizers.parameters())

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if self.harmonizers and not self.trains_harmonizers():
            return None  # identity stand-ins: nothing to train; LayerReplace's RL step still runs after the batch
        size = batch["input_ids"].shape[0]
        imitation = self._imitation(batch) if self.imitation_weight else None
        loss = lm_loss(self.model, batch)
        if imitation is not None:
            self.log_dict({"train/lm": loss.detach(), "train/imitation": imitation.detach()}, batch_size=size)
            loss = loss + self.imitation_weight * imitation
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def _imitation(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean normalised error of every harmonizer against its block on ``batch`` (graph kept for backward).

        One no-grad forward of the original model records each block's input and output; the replacement set
        that :class:`~privtune.callbacks.layer_replace.LayerReplace` sampled for this step is put back before the
        LM loss runs.
        """
        switches = {i: b for i, b in enumerate(get_blocks(unwrap(self.model))) if isinstance(b, LayerSwitch)}
        if not switches:
            raise ValueError(
                "HarmonizerImportance(imitation_weight > 0) found no harmonizer in the model: add the LayerReplace "
                "callback (privtune.callbacks.layer_replace.LayerReplace) to `trainer.callbacks`."
            )
        keep = {i: not switch.replaced for i, switch in switches.items()}
        try:
            io = _block_io(self.model, switches, batch)
        finally:
            set_replace_mask(switches, keep)
        return torch.stack(list(block_errors(switches, io, batch["attention_mask"]).values())).mean()

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", lm_loss(self.model, batch), prog_bar=True, batch_size=batch["input_ids"].shape[0])

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        if self.harmonizers and not self.trains_harmonizers():
            return None  # identity stand-ins (every harmonizer frozen): the fit learns only the importance scores
        params = [p for p in self.harmonizers.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "HarmonizerImportance has no harmonizer to train: add the LayerReplace callback "
                "(privtune.callbacks.layer_replace.LayerReplace) to `trainer.callbacks`."
            )
        return build_optimizer(params, self.optimizer_factory, self.lr, self.weight_decay)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only what stage 1 learns: the base model is reloaded from `model`.
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith(("harmonizers.", "layer_importance"))
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        if "layer_importance" in state_dict:  # the buffer's size is known only after LayerReplace's setup
            self.layer_importance = state_dict["layer_importance"].clone()
        return super().load_state_dict(state_dict, strict=False, assign=assign)
