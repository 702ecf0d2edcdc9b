"""Shake a Hugging Face model at setup, shake each batch before its step, recover the weights after training.

CypherTalk (Chen et al., arXiv 2403.07283) protects a user's tuning data and queries from the cloud that
tunes and serves the model by shaking the representation layer with a secret key (see
:mod:`privtune.shaking`). :class:`EmbeddingShaking` is the key holder's adapter for any Lightning project
with a Hugging Face model: it owns the key, the schedule and the checkpoint policy; the mathematics is in
the torch-only core.

Threat model: an honest-but-curious cloud holding the shaken model and the shaken ids, without the key.
This callback holds the key, so the run it is part of is the **client's** (or a trusted party's); a cloud
run receives an already shaken model and shaken data and has no such callback. Shaking gives **no formal
differential-privacy guarantee**; its strength is measured by :mod:`privtune.attacks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from privtune import __version__
from privtune.models.blocks import unwrap
from privtune.shaking import KeySetting, ShakeKey, find_embedding, recover_model, shake_model, shaking_state
from privtune.shaking.embedding import (
    head_is_vertical,
    permute_rows,
    recover_embedding,
    recover_head,
    shake_embedding,
    shake_head,
    shaken_parameter_names,
    unpermute_rows,
)
from privtune.shaking.recovery import freeze_representation

_RECOVERY = ("none", "horizontal", "full")
_CKPT = ("shaken", "recovered")
CHECKPOINT_FIELD = "privtune_shaking"


def find_hf_model(pl_module: nn.Module, attr: str | None = None) -> nn.Module:
    """The Hugging Face model inside a LightningModule: ``attr`` if given, else ``model``, else the first
    submodule with an ``nn.Embedding`` input embedding.

    Raises:
        ValueError: if no such model is found.
    """
    if attr is not None:
        model = getattr(pl_module, attr, None)
        if model is None:
            raise ValueError(f"`model_attr={attr!r}`: the LightningModule has no attribute {attr!r}.")
        find_embedding(model)
        return model
    candidates = [getattr(pl_module, "model", None)] + [m for _, m in pl_module.named_modules()]
    for model in candidates:
        if model is None or model is pl_module or not hasattr(unwrap(model), "get_input_embeddings"):
            continue
        try:
            find_embedding(model)
        except ValueError:
            continue
        return model
    raise ValueError(
        f"Cannot find the input embedding of `{type(pl_module).__name__}`: EmbeddingShaking needs a Hugging Face "
        "model (with `get_input_embeddings()`) inside the LightningModule. HINT: name its attribute with `model_attr`."
    )


class EmbeddingShaking(Callback):
    """Keep a model shaken by the client's key through training, and recover it afterwards.

    * ``setup``: load the key from ``key_path`` (or draw one from the operator setting and write it there,
      mode 0600), check it fits the embedding, shake the model once and freeze the shaken tables.
    * before every train/val/test/predict step: map ``input_ids`` (and token-level ``labels``) to shaken ids,
      and the module's ``label_token_ids`` (label words of decoder classifiers), for data that arrives
      unshaken. Data already shaken with :class:`~privtune.shaking.ShakenTokenizer` needs ``shake_batches=False``.
    * ``on_train_end``: apply ``recovery``: ``horizontal`` (default; exact, the model then works with the
      plain tokenizer), ``full`` (also inverts the vertical operators; changes a trained model's function,
      the recovery gap) or ``none`` (stay shaken for private inference).
    * checkpoints: ``checkpoint_weights="shaken"`` saves the live shaken weights; ``"recovered"`` writes the
      embedding/head of the checkpoint recovered (the live model stays shaken; a resume re-shakes them).
      The checkpoint records which under ``checkpoint["privtune_shaking"]["weights"]``.

    The key never enters logs, hyper-parameters or checkpoints: the callback's state holds the key's
    fingerprint and structure only, and resuming needs the key file (a different key is refused).

    Args:
        key_path: the client's key file (read if it exists, else written when ``generate_key``).
        operators: enabled vertical operators for a new key (``addv``, ``inflate``, ``tilt``, ``dx-fixp``,
            ``gaussian``, ``laplace``).
        chain_length: vertical steps of a new key (default 1, or ``len(chain)``; 0: horizontal only).
        chain: an explicit operator sequence for a new key (e.g. ``[gaussian, gaussian]``, the form the
            operator-setting search writes); each step then uses it instead of a random draw from ``operators``.
        scales: per-operator parameter overrides of a new key, e.g. ``{"gaussian": {"kappa": 0.5}}``.
        permute: draw a vocabulary permutation for a new key.
        pin: ``special`` keeps special-token ids fixed; ``none`` permutes them too.
        generate_key: draw a key when ``key_path`` does not exist (else that is an error).
        recovery: weight recovery at the end of training.
        checkpoint_weights: what checkpoints hold.
        shake_batches: map plain batches to shaken ids before each step.
        freeze_shaken: freeze the shaken embedding and head (recommended: training them leaks ``pi``).
        shake_lm_head_vertical: apply the vertical chain to the LM-head rows too (default). ``False`` keeps the
            head's plain rows, permuted only, and then the head alone reveals ``pi`` to table matching.
        model_attr: attribute of the LightningModule holding the Hugging Face model (found if ``None``).

    Raises:
        ValueError: for an unknown operator, a scale <= 0, or an unknown ``recovery``/``checkpoint_weights``/
            ``pin``, before any model is touched.

    Example::

        trainer = pl.Trainer(callbacks=[EmbeddingShaking("secrets/tweets.key", operators=["gaussian"])])
    """

    def __init__(
        self,
        key_path: str,
        operators: list[str] | None = None,
        chain_length: int | None = None,
        scales: dict[str, dict[str, float]] | None = None,
        permute: bool = True,
        pin: Literal["special", "none"] = "special",
        generate_key: bool = True,
        recovery: Literal["none", "horizontal", "full"] = "horizontal",
        checkpoint_weights: Literal["shaken", "recovered"] = "shaken",
        shake_batches: bool = True,
        freeze_shaken: bool = True,
        shake_lm_head_vertical: bool = True,
        model_attr: str | None = None,
        chain: list[str] | None = None,
    ) -> None:
        super().__init__()
        errors = []
        if recovery not in _RECOVERY:
            errors.append(f"`recovery={recovery!r}` must be one of {', '.join(_RECOVERY)}.")
        if checkpoint_weights not in _CKPT:
            errors.append(f"`checkpoint_weights={checkpoint_weights!r}` must be one of {', '.join(_CKPT)}.")
        if not key_path:
            errors.append("`key_path` must name the client's key file.")
        if errors:
            raise ValueError(" ".join(errors))
        # Validates operator names, scales, pin and chain length now, before any model is loaded.
        self.setting = KeySetting(
            operators=tuple(operators or ("gaussian",)),
            chain_length=chain_length,
            chain=tuple(chain or ()),
            scales={k: dict(v) for k, v in (scales or {}).items()},
            permute=permute,
            pin=pin,
        )
        self.key_path = str(key_path)
        self.generate_key = generate_key
        self.recovery = recovery
        self.checkpoint_weights = checkpoint_weights
        self.shake_batches = shake_batches
        self.freeze_shaken = freeze_shaken
        self.shake_lm_head_vertical = shake_lm_head_vertical
        self.model_attr = model_attr
        self.key: ShakeKey | None = None
        self._model: nn.Module | None = None
        self._plain_label_ids: Tensor | None = None
        self._unsaved = False

    @property
    def state_key(self) -> str:  # noqa: D102
        return self._generate_state_key(key_path=self.key_path)

    @property
    def active(self) -> bool:
        """Whether the model is currently shaken (batches are then mapped)."""
        return self._model is not None and shaking_state(self._model) == "shaken"

    # ------------------------------------------------------------------ key and model set-up
    def _load_or_generate_key(self, trainer: pl.Trainer, pl_module: pl.LightningModule, table: Tensor) -> ShakeKey:
        path = Path(self.key_path)
        if path.exists():
            return ShakeKey.load(path, vocab_size=table.shape[0], dim=table.shape[1])
        if not self.generate_key:
            raise ValueError(f"`key_path={self.key_path!r}` does not exist and `generate_key=False`.")
        # Written once the run is past checkpoint restoring (`_save_new_key`), so that resuming without the
        # key file fails without leaving a wrong key behind.
        self._unsaved = True
        return ShakeKey.generate(self.setting, table, pinned=self._special_ids(pl_module))

    def _save_new_key(self) -> None:
        if self._unsaved and self.key is not None:
            self.key.save(self.key_path)
            self._unsaved = False

    def _special_ids(self, pl_module: pl.LightningModule) -> list[int]:
        tokenizer = getattr(pl_module, "tokenizer", None)
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        config = unwrap(self._model).config
        ids |= {getattr(config, n, None) for n in ("pad_token_id", "bos_token_id", "eos_token_id")} - {None}
        flat = set()
        for i in ids:  # eos_token_id may be a list
            flat |= set(i) if isinstance(i, (list, tuple)) else {i}
        return sorted(int(i) for i in flat)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._model = find_hf_model(pl_module, self.model_attr)
        table = find_embedding(self._model).weight
        if self.key is None:
            self.key = self._load_or_generate_key(trainer, pl_module, table)
        else:
            self.key.check_table(table.shape[0], table.shape[1])
        if shaking_state(self._model) == "plain":
            shake_model(self._model, self.key, shake_lm_head_vertical=self.shake_lm_head_vertical)
            if self.freeze_shaken:
                freeze_representation(self._model)
        datamodule = getattr(trainer, "datamodule", None)
        ids = getattr(datamodule, "label_token_ids", None)
        if ids is None:
            ids = getattr(pl_module, "label_token_ids", None)
        if isinstance(ids, Tensor) and self._plain_label_ids is None:
            self._plain_label_ids = ids.detach().clone().cpu()

    # ------------------------------------------------------------------ per-step mapping
    def _sync_label_ids(self, pl_module: pl.LightningModule) -> None:
        if self._plain_label_ids is None or not hasattr(pl_module, "label_token_ids"):
            return
        ids = self.key.encode_ids(self._plain_label_ids) if self.active else self._plain_label_ids
        pl_module.label_token_ids = ids.to(pl_module.device)

    def shake_batch(self, batch: Any) -> Any:
        """Map a batch dict in place: ``input_ids`` and token-level ``labels`` (class labels are left alone)."""
        if not (self.active and self.shake_batches and isinstance(batch, dict)):
            return batch
        ids = batch.get("input_ids")
        if isinstance(ids, Tensor):
            batch["input_ids"] = self.key.encode_ids(ids)
            labels = batch.get("labels")
            if isinstance(labels, Tensor) and labels.shape == ids.shape:
                batch["labels"] = self.key.encode_ids(labels)
        return batch

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_new_key()
        self._sync_label_ids(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_new_key()
        self._sync_label_ids(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_new_key()
        self._sync_label_ids(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_new_key()
        self._sync_label_ids(pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.shake_batch(batch)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.shake_batch(batch)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.shake_batch(batch)

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.shake_batch(batch)

    # ------------------------------------------------------------------ recovery
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recovery != "none" and self.active:
            recover_model(self._model, self.key, self.recovery)
            self._sync_label_ids(pl_module)

    # ------------------------------------------------------------------ checkpoints and state
    def _rewrite(self, state: dict[str, Tensor], pl_module: pl.LightningModule, direction: str, mode: str) -> None:
        """Recover (``direction="recover"``) or re-shake (``"shake"``) the tables inside a state dict."""
        names = shaken_parameter_names(self._model, pl_module)
        full = mode == "full"
        head_vertical = full and head_is_vertical(self._model)
        recover = direction == "recover"
        for kind, entries in names.items():
            for name in entries:
                if name not in state:
                    continue
                t = state[name]
                if kind == "embedding":
                    new = (
                        recover_embedding(t, self.key, vertical=full)
                        if recover
                        else (shake_embedding(t, self.key) if full else permute_rows(t, self.key))
                    )
                elif kind == "head":
                    new = (recover_head if recover else shake_head)(t, self.key, vertical=head_vertical)
                else:  # the head's bias is only permuted
                    new = unpermute_rows(t, self.key) if recover else permute_rows(t, self.key)
                state[name] = new.to(t.dtype).clone()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        weights = shaking_state(self._model) if self._model is not None else "plain"
        if self.checkpoint_weights == "recovered" and weights == "shaken":
            mode = "full" if self.recovery == "full" else "horizontal"
            self._rewrite(checkpoint["state_dict"], pl_module, "recover", mode)
            weights = f"recovered-{mode}"
        checkpoint[CHECKPOINT_FIELD] = {
            "weights": weights,
            "key_fingerprint": self.key.fingerprint() if self.key is not None else None,
            "privtune_version": __version__,
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        info = checkpoint.get(CHECKPOINT_FIELD, {})
        weights = info.get("weights", "shaken")
        if weights.startswith("recovered-") and self.active:
            # The live model was shaken at setup, then loaded from the checkpoint: the tables the checkpoint
            # held (recovered) must be shaken again; tables it did not hold (e.g. frozen ones a module leaves
            # out of its checkpoints) are still the shaken ones from setup.
            live = pl_module.state_dict(keep_vars=True)
            names = shaken_parameter_names(self._model, pl_module)
            saved = checkpoint.get("state_dict", {})
            loaded = {n: live[n].detach().clone() for group in names.values() for n in group if n in saved}
            self._rewrite(loaded, pl_module, "shake", weights.removeprefix("recovered-"))
            with torch.no_grad():
                for name, value in loaded.items():
                    live[name].detach().copy_(value)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.key is None:
            return {"privtune_version": __version__}
        return {"privtune_version": __version__, **self.key.describe()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        expected = state_dict.get("fingerprint")
        if expected is not None and self._unsaved:
            raise ValueError(
                f"Resuming needs the key the checkpoint was trained with (fingerprint {expected}), but "
                f"`key_path={self.key_path!r}` does not exist; a new key would not match its shaken weights."
            )
        if expected is not None and self.key is not None and self.key.fingerprint() != expected:
            raise ValueError(
                f"`key_path={self.key_path!r}` holds a different key (fingerprint {self.key.fingerprint()}) than the "
                f"checkpoint was trained with ({expected}); resume with the original key file."
            )
