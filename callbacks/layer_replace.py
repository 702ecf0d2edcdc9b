"""Dynamic LayerReplace with learned layer importance (ScaleOT, arXiv 2412.09812), as a Callback.

At ``setup`` the callback creates one harmonizer per candidate layer in the LightningModule's
``harmonizers`` ``ModuleDict`` (so the module's optimizer trains them and checkpoints hold them), freezes the
original model and wraps each candidate block in a :class:`~privtune.emulator.LayerSwitch`. Every training
step it samples a keep mask from the importance scores before the batch (the DL step then trains the
harmonizers of the replaced layers), and after the batch runs the RL step: ``N_c`` masks scored on
held-out batches (the datamodule's validation loader, cycled) and the REINFORCE update. Validation runs
with the ``val_alpha`` least important candidates replaced, so ``val/loss`` tracks the emulator-to-be.

Works with any LightningModule that has a Hugging Face causal LM at ``model_attr`` and an
``nn.ModuleDict`` named ``harmonizers`` (see :class:`privtune.modules.offsite_importance.HarmonizerImportance`).
The scores, the sampler's RNG and the position in the held-out stream are saved in checkpoints, so a
killed run resumes to the same result. Threat model: model-owner side only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from privtune.contracts import ContractError, model_at
from privtune.emulator import (
    LayerImportance,
    SandwichSplit,
    install_switches,
    least_important,
    make_harmonizers,
    rl_step,
    set_replace_mask,
    warm_start_harmonizers,
)
from privtune.emulator.harmonizer import LayerSwitch
from privtune.emulator.importance import REWARDS
from privtune.models import get_blocks, unwrap
from privtune.modules.offsite_importance import harmonizer_errors

DOCS = "docs/offsite_tuning.md, 'ScaleOT stage 1'"
STAND_INS = ("trained", "identity")
LM_BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def check_lm_batch(batch: Any, what: str) -> None:
    """Refuse a batch the causal-LM loss cannot read: a mapping with ``input_ids``, ``attention_mask``, ``labels``.

    Raises:
        ContractError: naming the missing keys, before the step runs.
    """
    missing = [k for k in LM_BATCH_KEYS if not isinstance(batch, Mapping) or k not in batch]
    if missing:
        kind = f"keys {sorted(batch)}" if isinstance(batch, Mapping) else type(batch).__name__
        raise ContractError(
            f"LayerReplace: {what} ({kind}) lacks {missing}; ScaleOT stage 1 scores layers with the causal-LM loss "
            f"and needs dict batches with {list(LM_BATCH_KEYS)} (e.g. privtune.datamodules.LMCorpus; {DOCS})."
        )


class LayerReplace(pl.Callback):
    """Sample replaced layers each step and learn their importance (ScaleOT stage 1).

    Args:
        adapter_bottom: bottom adapter blocks, never replaced.
        adapter_top: top adapter blocks, never replaced.
        layers: candidate block indices (default: every middle block).
        harmonizer_rank: harmonizer bottleneck (capped at the hidden size).
        group_size: ``N_g``; each group of consecutive candidates keeps half of its layers per sample.
        num_candidates: ``N_c`` masks per RL step (>= 2).
        rl_lr: ``η`` of the score update.
        reward: ``exp`` (ScaleOT's ``exp(−L_j) − mean exp(−L_c)``) or ``relative`` (the same divided by
            ``mean exp(−L_c)``; free of the loss level, see :func:`~privtune.emulator.importance.rewards` and
            docs/offsite_tuning.md "Diagnosis").
        val_alpha: fraction of candidates replaced during validation (least important first).
        seed: seed of the harmonizer init and of the mask sampler.
        model_attr: attribute of the LightningModule holding the Hugging Face model.
        log_scores: log every score each step (``importance/s_<i>``).
        warm_start_batches: before the first step, fit each fresh harmonizer to its own block on this many
            training batches (:func:`~privtune.emulator.warm_start_harmonizers`; 0 = off, the paper's identity
            start). Skipped when resuming, since the harmonizers come from the checkpoint.
        warm_start_steps: Adam steps per warm-start batch.
        warm_start_lr: Adam learning rate of the warm start.
        stand_ins: ``trained`` (ScaleOT: each replaced block's harmonizer is trained under Dynamic LayerReplace) or
            ``identity`` (every harmonizer stays at its identity initialisation, i.e. a replaced block is dropped,
            and only the importance scores are learned: the scores then rank blocks by what dropping them costs;
            the ablation's arm c, docs/offsite_tuning.md). With ``identity`` the harmonizers are frozen, the module
            skips its training forward (nothing to train) and ``warm_start_batches`` must be 0.
        error_every: every this many steps (and on the first), measure each harmonizer's normalised error against
            its block on the step's held-out batch (:func:`~privtune.modules.offsite_importance.harmonizer_errors`,
            one forward of the original model), log it as ``harmonizer/error_<i>`` and keep it in
            :attr:`error_curve`; 0 turns it off.

    Contract (:class:`privtune.contracts.HarmonizerStage1Module`): a model with a block list at ``model_attr``,
    an ``harmonizers`` ``nn.ModuleDict``; dict LM batches with ``input_ids``, ``attention_mask``, ``labels``
    (checked on the first batch, before its step); with ``warm_start_batches``, a datamodule.

    Raises:
        ValueError: for ``num_candidates < 2``, ``group_size < 1``, ``rl_lr <= 0``, an unknown ``reward``,
            ``val_alpha`` outside ``[0, 1)``, ``harmonizer_rank < 1``, ``error_every < 0`` or a bad warm-start
            setting; in ``setup``, for candidates outside the middle.
        privtune.contracts.ContractError: in ``setup``, for a wrong ``model_attr``, a module without
            ``harmonizers`` or a warm start without a datamodule; before a step, for a batch without LM keys.
    """

    def __init__(
        self,
        adapter_bottom: int = 2,
        adapter_top: int = 2,
        layers: list[int] | None = None,
        harmonizer_rank: int = 64,
        group_size: int = 4,
        num_candidates: int = 3,
        rl_lr: float = 0.1,
        reward: Literal["exp", "relative"] = "exp",
        stand_ins: Literal["trained", "identity"] = "trained",
        val_alpha: float = 0.5,
        seed: int = 0,
        model_attr: str = "model",
        log_scores: bool = True,
        warm_start_batches: int = 0,
        warm_start_steps: int = 4,
        warm_start_lr: float = 1e-3,
        error_every: int = 10,
    ) -> None:
        problems = []
        if num_candidates < 2:
            problems.append(f"`num_candidates={num_candidates}` must be >= 2")
        if group_size < 1:
            problems.append(f"`group_size={group_size}` must be >= 1")
        if not rl_lr > 0:
            problems.append(f"`rl_lr={rl_lr}` must be > 0")
        if reward not in REWARDS:
            problems.append(f"`reward={reward!r}` must be one of {REWARDS}")
        if stand_ins not in STAND_INS:
            problems.append(f"`stand_ins={stand_ins!r}` must be one of {STAND_INS}")
        elif stand_ins == "identity" and warm_start_batches:
            problems.append(
                f"`stand_ins='identity'` keeps every harmonizer at the identity, but `warm_start_batches="
                f"{warm_start_batches}` would fit them to their blocks: set `warm_start_batches: 0`"
            )
        if not 0.0 <= val_alpha < 1.0:
            problems.append(f"`val_alpha={val_alpha}` must be in [0, 1)")
        if harmonizer_rank < 1:
            problems.append(f"`harmonizer_rank={harmonizer_rank}` must be >= 1")
        if warm_start_batches < 0 or warm_start_steps < 1 or not warm_start_lr > 0:
            problems.append(
                f"`warm_start_batches={warm_start_batches}` must be >= 0, `warm_start_steps={warm_start_steps}` "
                f">= 1 and `warm_start_lr={warm_start_lr}` > 0"
            )
        if error_every < 0:
            problems.append(f"`error_every={error_every}` must be >= 0 (0: no harmonizer error curve)")
        if problems:
            raise ValueError("LayerReplace: " + "; ".join(problems) + ".")
        self.adapter_bottom, self.adapter_top = adapter_bottom, adapter_top
        self.layers = list(layers) if layers is not None else None
        self.harmonizer_rank = harmonizer_rank
        self.group_size = group_size
        self.num_candidates = num_candidates
        self.rl_lr = rl_lr
        self.reward = reward
        self.stand_ins = stand_ins
        self.val_alpha = val_alpha
        self.seed = seed
        self.model_attr = model_attr
        self.log_scores = log_scores
        self.warm_start_batches, self.warm_start_steps, self.warm_start_lr = (
            warm_start_batches,
            warm_start_steps,
            warm_start_lr,
        )
        self.warm_start_error: tuple[float, float] | None = None
        self.error_every = error_every
        self.error_curve: list[dict[str, Any]] = []  # [{"step": s, "<block index>": normalised error, ...}]
        self.importance: LayerImportance | None = None
        self.switches: dict[int, LayerSwitch] = {}
        self.rl_batches = 0  # held-out batches consumed so far (to resume the stream at the same place)
        self._pending_state: dict[str, Any] | None = None
        self._held_out: Iterator | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, seed=self.seed)

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.switches:
            return
        model = model_at(pl_module, self.model_attr, "LayerReplace", DOCS)
        harmonizers = getattr(pl_module, "harmonizers", None)
        if not isinstance(harmonizers, nn.ModuleDict):
            raise ContractError(
                f"LayerReplace: {type(pl_module).__name__} has no `harmonizers` nn.ModuleDict (HarmonizerStage1Module "
                "in privtune.contracts): the callback puts one harmonizer per candidate block there so the module's "
                f"optimizer trains them. HINT: use HarmonizerImportance or add `self.harmonizers = nn.ModuleDict()` "
                f"({DOCS})."
            )
        try:
            depth = len(get_blocks(unwrap(model)))
        except (TypeError, ValueError, AttributeError) as err:
            raise ContractError(
                f"LayerReplace: the model at `model_attr={self.model_attr!r}` ({type(model).__name__}) has no block "
                f"list privtune can find ({err}); it needs a Hugging Face decoder (BlockModel, {DOCS})."
            ) from err
        if self.warm_start_batches and not callable(getattr(trainer.datamodule, "train_dataloader", None)):
            raise ContractError(
                f"LayerReplace: `warm_start_batches={self.warm_start_batches}` reads training batches from "
                "`trainer.datamodule.train_dataloader()`, but the fit has no datamodule. HINT: pass a datamodule to "
                f"`trainer.fit(..., datamodule=...)` or set `warm_start_batches: 0` ({DOCS})."
            )
        split = SandwichSplit(depth, self.adapter_bottom, self.adapter_top)
        layers = self.layers if self.layers is not None else split.middle_indices
        bad = [i for i in layers if i not in split.middle_indices]
        if bad:
            raise ValueError(f"`layers={layers}`: {bad} are not middle blocks {split.middle_indices}.")
        hidden = unwrap(model).config.hidden_size
        model.requires_grad_(False)
        if not len(harmonizers):
            harmonizers.update(make_harmonizers(hidden, layers, min(self.harmonizer_rank, hidden), self.seed))
        # identity stand-ins: frozen at their identity initialisation (HarmonizerImportance then trains nothing)
        harmonizers.requires_grad_(self.stand_ins == "trained")
        self.switches = install_switches(model, harmonizers)
        self.importance = LayerImportance(layers, self.group_size, self.seed, self.reward)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
        pl_module.layer_importance = self.importance.scores.clone()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.warm_start_batches or trainer.global_step > 0 or self._pending_state is not None:
            return
        if trainer.ckpt_path is not None:  # resumed: the harmonizers were restored
            return
        device = pl_module.device

        def batches() -> Iterator[dict[str, Any]]:
            loader = trainer.datamodule.train_dataloader()
            for _, batch in zip(range(self.warm_start_batches), loader):
                yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

        model = getattr(pl_module, self.model_attr)
        with torch.enable_grad():
            self.warm_start_error = warm_start_harmonizers(
                model, self.switches, batches(), self.warm_start_steps, self.warm_start_lr
            )
        before, after = self.warm_start_error
        rank_zero_info(
            f"Harmonizer warm start on {self.warm_start_batches} batches: normalised block error "
            f"{before:.3f} -> {after:.3f} (1.0 = layer drop)"
        )

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        check_lm_batch(batch, "a training batch")
        set_replace_mask(self.switches, self.importance.sample())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        held_out = self._next_held_out(trainer, pl_module, batch)
        model = getattr(pl_module, self.model_attr)
        masks, losses = rl_step(model, self.switches, self.importance, held_out, self.num_candidates, self.rl_lr)
        pl_module.layer_importance = self.importance.scores.clone().to(pl_module.device)
        pl_module.log("importance/rl_loss_mean", sum(losses) / len(losses), batch_size=1)
        step = trainer.global_step
        if self.error_every and (step % self.error_every == 0 or step == 1 or step == trainer.max_steps):
            errors = harmonizer_errors(model, self.switches, held_out)
            self.error_curve.append({"step": step} | {str(i): e for i, e in errors.items()})
            for layer, error in errors.items():
                pl_module.log(f"harmonizer/error_{layer}", error, batch_size=1)
        if self.log_scores:
            for layer, score in zip(self.importance.layers, self.importance.scores.tolist()):
                pl_module.log(f"importance/s_{layer}", score, batch_size=1)
            replaced = sum(not k for m in masks for k in m.values()) / len(masks)
            pl_module.log("importance/replaced_per_mask", float(replaced), batch_size=1)

    def _next_held_out(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> dict[str, Any]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return batch  # no held-out stream: score masks on the training batch
        if self._held_out is None:
            self._held_out = self._stream(datamodule)
        out = next(self._held_out)
        check_lm_batch(out, "a held-out batch of `datamodule.val_dataloader()`")
        self.rl_batches += 1
        return {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in out.items()}

    def _stream(self, datamodule: Any) -> Iterator:
        skip = self.rl_batches
        while True:
            for item in datamodule.val_dataloader():
                if skip:
                    skip -= 1
                    continue
                yield item

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.importance is None:
            return
        replaced = set(least_important(self.importance.scores, self.importance.layers, self.val_alpha))
        set_replace_mask(self.switches, {i: i not in replaced for i in self.importance.layers})

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_replace_mask(self.switches, {})

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_replace_mask(self.switches, {})
        if self.importance is not None:
            order = sorted(zip(self.importance.scores.tolist(), self.importance.layers))
            rank_zero_info("Layer importance (lowest first): " + ", ".join(f"{i}:{s:+.2e}" for s, i in order))

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.importance is None:
            return {}
        return {
            "importance": self.importance.state_dict(),
            "rl_batches": self.rl_batches,
            "error_curve": list(self.error_curve),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.error_curve = list(state_dict.get("error_curve", []))
        if self.importance is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.importance.load_state_dict(state["importance"])
        self.rl_batches = int(state.get("rl_batches", 0))
        self._held_out = None
