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

What it needs (:mod:`privtune.contracts`, docs/shaking.md): exactly one Hugging Face model in the
LightningModule (:class:`~privtune.contracts.ShakeableModel`, or the one ``model_attr`` names) and batches
whose token ids it can find (:class:`~privtune.contracts.TokenBatch`: ``batch_key``, ``labels_key`` or
``ids_getter``). Anything else is refused at setup, or at the first batch it cannot read; never skipped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from privtune import __version__
from privtune.contracts import ShakeableModel, ShakingKeyUser, conforms
from privtune.models.blocks import get_lm_head, unwrap
from privtune.shaking import KeySetting, ShakeKey, find_embedding, recover_model, shake_model, shaking_state
from privtune.shaking.batches import AUTO, BatchIds, UnreadableBatchError
from privtune.shaking.embedding import (
    STATE_ATTR,
    head_is_vertical,
    is_tied,
    permute_rows,
    recover_embedding,
    recover_head,
    restore_plain,
    shake_embedding,
    shake_head,
    shaken_parameter_names,
    shaking_fingerprint,
    unpermute_rows,
)
from privtune.shaking.key import KEY_OPTIONS, compare_key_options
from privtune.shaking.recovery import freeze_representation

_RECOVERY = ("none", "horizontal", "full")
_CKPT = ("shaken", "recovered")
CHECKPOINT_FIELD = "privtune_shaking"
DOCS = "docs/shaking.md"
log = logging.getLogger(__name__)


class KeyMismatchError(ValueError):
    """The key in use is not the key a checkpoint or a shaken model was made with."""


def _resolve(root: nn.Module, attr: str) -> Any:
    value: Any = root
    for part in attr.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def hf_model_candidates(pl_module: nn.Module) -> dict[str, nn.Module]:
    """Every distinct :class:`~privtune.contracts.ShakeableModel` inside ``pl_module``, by attribute path.

    Models that share one input embedding (a peft wrapper and its base, a causal LM and its backbone) count
    once, under the outermost name.
    """
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in pl_module.named_modules():
        if module is pl_module or not conforms(unwrap(module), ShakeableModel):
            continue
        try:
            emb = find_embedding(module)
        except ValueError:
            continue
        found.setdefault(id(emb.weight), (name, module))
    return dict(found.values())


def find_hf_model(pl_module: nn.Module, attr: str | None = None) -> nn.Module:
    """The Hugging Face model to shake: ``attr`` (a dotted attribute path) if given, else the only one.

    Raises:
        ValueError: if ``attr`` names nothing or no shakeable model; if none is found; or if several are (a
            frozen teacher next to the student, say), since shaking the wrong one protects nothing.
    """
    if attr is not None:
        model = _resolve(pl_module, attr)
        if model is None:
            found = sorted(hf_model_candidates(pl_module))
            raise ValueError(
                f"`model_attr={attr!r}`: `{type(pl_module).__name__}` has no attribute {attr!r}; the Hugging Face "
                f"models found in it are {found}. See {DOCS}."
            )
        if not isinstance(model, nn.Module) or not conforms(unwrap(model), ShakeableModel):
            raise ValueError(
                f"`model_attr={attr!r}` is a `{type(model).__name__}`, not a Hugging Face model with "
                f"`get_input_embeddings()` and `config` (privtune.contracts.ShakeableModel). See {DOCS}."
            )
        try:
            find_embedding(model)
        except ValueError as err:
            raise ValueError(f"`model_attr={attr!r}`: {err}") from None
        return model
    candidates = hf_model_candidates(pl_module)
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if not candidates:
        raise ValueError(
            f"Cannot find the input embedding of `{type(pl_module).__name__}`: EmbeddingShaking needs a Hugging Face "
            "model (with `get_input_embeddings()` returning an `nn.Embedding`, privtune.contracts.ShakeableModel) "
            f"inside the LightningModule. HINT: name its attribute with `model_attr`; see {DOCS}."
        )
    names = sorted(candidates)
    raise ValueError(
        f"`{type(pl_module).__name__}` holds {len(names)} Hugging Face models with separate input embeddings "
        f"({', '.join(names)}); EmbeddingShaking shakes one, and shaking the wrong one would leave the model that "
        f"reads the batches plain. HINT: set `model_attr` to the one the batches feed, e.g. "
        f"`model_attr={names[0]!r}`; see {DOCS}."
    )


class EmbeddingShaking(Callback):
    """Keep a model shaken by the client's key through training, and recover it afterwards.

    * ``setup``: load the key from ``key_path`` (or draw one from the operator setting and write it there,
      mode 0600), check it fits the embedding and the configured key options, refuse an identity key, check
      the first training batch can be read, then shake the model once and freeze the shaken tables.
    * before every train/val/test/predict step: map the token ids (``batch_key``) and token-level labels
      (``labels_key``) to shaken ids, and the module's ``label_token_ids`` (label words of decoder
      classifiers), for data that arrives unshaken. A batch it cannot read is an error, never skipped. Data
      already shaken with :class:`~privtune.shaking.ShakenTokenizer` needs ``shake_batches=False``.
    * ``on_train_end``: apply ``recovery``: ``horizontal`` (default; exact, the model then works with the
      plain tokenizer), ``full`` (also inverts the vertical operators; changes a trained model's function,
      the recovery gap) or ``none`` (stay shaken for private inference).
    * after ``validate``/``test``/``predict`` (``teardown``): a model the run shook is restored to the original
      unless ``recovery="none"``.
    * ``on_exception``: a run that fails leaves the model as it came: shaken tables that were not trained are
      restored exactly (``plain`` again), trained ones recovered horizontally; if even that fails, the log
      says where the key is and how to recover.
    * checkpoints: ``checkpoint_weights="shaken"`` saves the live shaken weights; ``"recovered"`` writes the
      embedding/head of the checkpoint recovered (the live model stays shaken; a resume re-shakes them).
      The checkpoint records which, and the key's fingerprint, under ``checkpoint["privtune_shaking"]``;
      resuming with any other key (whatever its path) is refused, naming both fingerprints.

    The key never enters logs, hyper-parameters or checkpoints: the callback's state holds the key's
    fingerprint and structure only, and resuming needs the key file.

    Args:
        key_path: the client's key file (read if it exists, else written when ``generate_key``).
        operators: enabled vertical operators for a new key (``addv``, ``inflate``, ``tilt``, ``dx-fixp``,
            ``gaussian``, ``laplace``; default ``[gaussian]``).
        chain_length: vertical steps of a new key (default 1, or ``len(chain)``; 0: horizontal only).
        scales: per-operator parameter overrides of a new key, e.g. ``{"gaussian": {"kappa": 0.5}}``.
        permute: draw a vocabulary permutation for a new key (default ``True``).
        pin: ``special`` (default) keeps special-token ids fixed; ``none`` permutes them too.
        generate_key: draw a key when ``key_path`` does not exist (else that is an error).
        recovery: weight recovery at the end of training.
        checkpoint_weights: what checkpoints hold.
        shake_batches: map plain batches to shaken ids before each step.
        freeze_shaken: freeze the shaken embedding and head (recommended: training them leaks ``pi``).
        shake_lm_head_vertical: apply the vertical chain to the LM-head rows too (default). ``False`` keeps the
            head's plain rows, permuted only, and then the head alone reveals ``pi`` to table matching.
        model_attr: attribute (dotted path) of the LightningModule holding the Hugging Face model; needed when
            the module holds more than one (e.g. a frozen teacher).
        chain: an explicit operator sequence for a new key (e.g. ``[gaussian, gaussian]``, the form the
            operator-setting search writes); each step then uses it instead of a random draw from ``operators``.
        allow_identity_key: accept a key that changes nothing (``permute: false`` and no vertical step), under
            which the cloud sees the plain ids and the plain model; for tests and baselines only.
        batch_key: where a batch holds its token ids: a mapping key (default ``"input_ids"``) or, for list/tuple
            batches, an index (e.g. ``0``).
        labels_key: token-level labels mapped with the ids: ``"auto"`` (``"labels"`` of a mapping when shaped
            like the ids; a list/tuple batch with another integer tensor shaped like the ids must say), a key or
            index, or ``None``.
        ids_getter: ``batch -> LongTensor`` for any other batch type (the tensor is mapped in place).

    The options ``operators``, ``chain_length``, ``chain``, ``scales``, ``permute`` and ``pin`` draw a new key;
    once the key file exists it decides, and a given option that contradicts it is an error (one the file
    cannot confirm, e.g. a scale of an operator the key does not use, is named in a warning).

    Raises:
        ValueError: for an unknown operator, a scale <= 0, an unknown ``recovery``/``checkpoint_weights``/
            ``pin``, or an identity key setting without ``allow_identity_key``, before any model is touched.

    Example::

        trainer = pl.Trainer(callbacks=[EmbeddingShaking("secrets/tweets.key", operators=["gaussian"])])
    """

    #: refused by the federated Strategies (privtune.contracts.FederatedAware): clients' batches never reach it
    federated_support: ClassVar[str] = "refuse"
    federated_alternative: ClassVar[str] = (
        "shake the data with one key on the data owner's side (`ShakenTokenizer`, docs/shaking.md) or, for a "
        "guarantee, use client-level DP (`strategy.init_args.federated.client_dp`, docs/federated.md)"
    )

    def __init__(
        self,
        key_path: str,
        operators: list[str] | None = None,
        chain_length: int | None = None,
        scales: dict[str, dict[str, float]] | None = None,
        permute: bool | None = None,
        pin: Literal["special", "none"] | None = None,
        generate_key: bool = True,
        recovery: Literal["none", "horizontal", "full"] = "horizontal",
        checkpoint_weights: Literal["shaken", "recovered"] = "shaken",
        shake_batches: bool = True,
        freeze_shaken: bool = True,
        shake_lm_head_vertical: bool = True,
        model_attr: str | None = None,
        chain: list[str] | None = None,
        allow_identity_key: bool = False,
        batch_key: str | int = "input_ids",
        labels_key: str | int | None = AUTO,
        ids_getter: Callable[[Any], Tensor] | None = None,
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
        given = {
            "operators": operators,
            "chain_length": chain_length,
            "chain": chain,
            "scales": scales,
            "permute": permute,
            "pin": pin,
        }
        #: the key options set explicitly (checked against an existing key file at setup)
        self.given_key_options = {k: v for k, v in given.items() if v is not None and k in KEY_OPTIONS}
        # Validates operator names, scales, pin and chain length now, before any model is loaded.
        self.setting = KeySetting(
            operators=tuple(operators or ("gaussian",)),
            chain_length=chain_length,
            chain=tuple(chain or ()),
            scales={k: dict(v) for k, v in (scales or {}).items()},
            permute=True if permute is None else permute,
            pin="special" if pin is None else pin,
        )
        if not allow_identity_key and not self.setting.permute and self.setting.chain_length == 0:
            raise ValueError(
                "`permute=False` with no vertical step (`chain_length=0`) is an identity key: the cloud would see "
                "the plain ids and the plain model. HINT: set `permute: true` or a vertical chain; "
                "`allow_identity_key=True` accepts it for tests and baselines."
            )
        self.batches = BatchIds(batch_key=batch_key, labels_key=labels_key, ids_getter=ids_getter)
        self.key_path = str(key_path)
        self.generate_key = generate_key
        self.recovery = recovery
        self.checkpoint_weights = checkpoint_weights
        self.shake_batches = shake_batches
        self.freeze_shaken = freeze_shaken
        self.shake_lm_head_vertical = shake_lm_head_vertical
        self.model_attr = model_attr
        self.allow_identity_key = allow_identity_key
        self.key: ShakeKey | None = None
        self._model: nn.Module | None = None
        self._plain_label_ids: Tensor | None = None
        self._unsaved = False
        self._shook_here = False  # this callback shook the model (so a failed run un-shakes it)
        self._foreign = False  # the live model holds weights of another key (a refused resume)

    @property
    def state_key(self) -> str:  # noqa: D102
        # Not keyed by the key path: a resume under another path must still meet the fingerprint check.
        return self._generate_state_key(model_attr=self.model_attr)

    @property
    def active(self) -> bool:
        """Whether the model is currently shaken (batches are then mapped)."""
        return self._model is not None and shaking_state(self._model) == "shaken"

    # ------------------------------------------------------------------ key and model set-up
    def _load_or_generate_key(self, pl_module: pl.LightningModule, table: Tensor) -> ShakeKey:
        path = Path(self.key_path)
        if path.exists():
            key = ShakeKey.load(path, vocab_size=table.shape[0], dim=table.shape[1])
            ignored = compare_key_options(key, self.given_key_options, source=f"`key_path={self.key_path!r}`")
            if ignored:
                rank_zero_warn(
                    f"EmbeddingShaking: `key_path={self.key_path!r}` exists and decides the key; these configured "
                    f"key options are ignored: {'; '.join(ignored)}."
                )
            return key
        if not self.generate_key:
            raise ValueError(f"`key_path={self.key_path!r}` does not exist and `generate_key=False`.")
        # Written once the run is past checkpoint restoring (`_save_new_key`), so that resuming without the
        # key file fails without leaving a wrong key behind.
        self._unsaved = True
        return ShakeKey.generate(self.setting, table, pinned=self._special_ids(pl_module))

    def _check_key(self, key: ShakeKey) -> None:
        if key.is_identity and not self.allow_identity_key:
            raise ValueError(
                f"`key_path={self.key_path!r}` holds an identity key (no permutation, no vertical step, fingerprint "
                f"{key.fingerprint()}): the cloud would see the plain ids and the plain model. HINT: use a key "
                "with `permute: true` or a vertical chain; `allow_identity_key=True` accepts it for tests and "
                "baselines."
            )
        if not key.permute:
            rank_zero_warn(
                f"EmbeddingShaking: the key (fingerprint {key.fingerprint()}) has no vocabulary permutation: the "
                "ids the cloud sees are the plain ids; only the embedding rows are perturbed."
            )
        recorded = shaking_fingerprint(self._model)
        if shaking_state(self._model) != "plain" and recorded is not None and recorded != key.fingerprint():
            raise KeyMismatchError(
                f"The model was shaken with the key of fingerprint {recorded}, but `key_path={self.key_path!r}` "
                f"holds fingerprint {key.fingerprint()}; tuning it under this key would compose two keys. HINT: "
                "point `key_path` at the key the model was shaken with."
            )

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

    def _peek_train_batch(self, trainer: pl.Trainer) -> None:
        """Collate the first examples of a map-style training set and check the batch can be read.

        Only where it is cheap and side-effect free: the batch is built as torch's map-style fetcher builds it
        (``__getitems__`` or indexing, then the loader's ``collate_fn``), no sampler or worker runs, and the random
        states are restored. Anything it cannot peek (an iterable dataset, a dataset that fails to index) is
        checked at the first batch instead.
        """
        try:
            source = trainer.fit_loop._data_source
            loader = source.dataloader() if source.is_defined() else None
        except Exception:  # noqa: BLE001 - peeking is best effort; the first batch is checked regardless
            return
        if not isinstance(loader, torch.utils.data.DataLoader):
            return
        dataset = loader.dataset
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            return
        states = random.getstate(), _numpy_state()
        with torch.random.fork_rng(devices=[]):
            try:
                if len(dataset) == 0:
                    return
                if loader.batch_sampler is None:  # no automatic batching: each item is a batch
                    batch = loader.collate_fn(dataset[0])
                else:  # as torch's map-style fetcher builds a batch
                    indices = list(range(min(2, len(dataset))))
                    getitems = getattr(dataset, "__getitems__", None)
                    items = getitems(indices) if callable(getitems) else [dataset[i] for i in indices]
                    batch = loader.collate_fn(items)
            except Exception:  # noqa: BLE001
                return
            finally:
                random.setstate(states[0])
                _set_numpy_state(states[1])
        self.batches.check(batch, where="first training")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Everything is checked before the model is touched; shaking is the last step.
        self._shook_here = self._foreign = False  # per run: a failed run un-shakes only what it shook
        self._model = find_hf_model(pl_module, self.model_attr)
        table = find_embedding(self._model).weight
        if self.key is None:
            self.key = self._load_or_generate_key(pl_module, table)
        else:
            self.key.check_table(table.shape[0], table.shape[1])
        self._check_key(self.key)
        state = shaking_state(self._model)
        if stage == "fit" and state.startswith("recovered-"):
            raise ValueError(
                f"The model was shaken and then recovered ({state!r}); fitting it under EmbeddingShaking would train "
                "it unshaken. HINT: fit a fresh model, or resume from a checkpoint of the shaken run."
            )
        if self.shake_batches and stage == "fit":
            self._peek_train_batch(trainer)
        if isinstance(pl_module, ShakingKeyUser):  # e.g. ShakeRecovery; it may refuse this configuration
            pl_module.attach_shaking_key(self.key, maps_batches=self.shake_batches)
        if state == "plain":
            shake_model(self._model, self.key, shake_lm_head_vertical=self.shake_lm_head_vertical)
            self._shook_here = True
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

    def shake_batch(self, batch: Any, where: str = "training") -> Any:
        """Map a batch's token ids and token-level labels to shaken ids (class labels are left alone).

        Raises:
            UnreadableBatchError: if the batch's ids are not where ``batch_key``/``ids_getter`` say.
        """
        if not (self.active and self.shake_batches):
            return batch
        return self.batches.shake(batch, self.key, where)

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
        self.shake_batch(batch, "training")

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.shake_batch(batch, "validation")

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.shake_batch(batch, "test")

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.shake_batch(batch, "predict")

    # ------------------------------------------------------------------ recovery
    @contextmanager
    def recovered_view(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Inside the block, the model as the data owner holds it after ``recovery='horizontal'``; shaken again after.

        CypherTalk's horizontal recovery (Chen et al., arXiv 2403.07283) un-permutes the shaken rows: the recovered
        model reads plain ids with the plain tokenizer and gives the shaken model's logits on the shaken ids. Here it
        is applied in place for the length of the block (the label words go back to their plain ids too) and undone
        on exit by permuting the same rows back: an index gather both ways, so the shaken model is restored bit for
        bit. :class:`~privtune.callbacks.MembershipAudit` scores its reference here at fit start: the untuned model
        as it would be released after the run's recovery, the plain-space model the attacker queries.

        Raises:
            ValueError: if ``recovery`` is not ``horizontal`` (``none`` releases a shaken model, and ``full`` is not
                exact on the live tables) or the model is not shaken now.
        """
        if self.recovery != "horizontal":
            raise ValueError(
                f"EmbeddingShaking.recovered_view needs `recovery='horizontal'` (got {self.recovery!r}): only the "
                f"horizontal recovery is exact and can be undone in place. See {DOCS}."
            )
        if not self.active:
            raise ValueError("EmbeddingShaking.recovered_view: the model is not shaken now; there is nothing to view.")
        model = self._model
        recover_model(model, self.key, "horizontal")
        self._sync_label_ids(pl_module)
        try:
            yield
        finally:
            with torch.no_grad():
                emb = find_embedding(model)
                emb.weight.copy_(permute_rows(emb.weight, self.key))
                head = get_lm_head(model)
                if head is not None and not is_tied(model):
                    head.weight.copy_(permute_rows(head.weight, self.key))
                    if getattr(head, "bias", None) is not None:
                        head.bias.copy_(permute_rows(head.bias, self.key))
            setattr(unwrap(model).config, STATE_ATTR, "shaken")
            self._sync_label_ids(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recovery != "none" and self.active:
            recover_model(self._model, self.key, self.recovery)
            self._sync_label_ids(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # validate/test/predict never train the tables: a model this run shook goes back to the original, as
        # `recovery` asks ("none" keeps it shaken for private inference).
        if stage != "fit" and self.recovery != "none" and self._shook_here and self.active:
            restore_plain(self._model, self.key)
            self._shook_here = False
            self._sync_label_ids(pl_module)

    def _tables_trained(self, pl_module: pl.LightningModule) -> bool:
        params = dict(pl_module.named_parameters(remove_duplicate=False))
        names = shaken_parameter_names(self._model, pl_module)
        return any(params[n].requires_grad for group in names.values() for n in group if n in params)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not (self._shook_here and self.active and self.key is not None):
            return
        where = f"`{self.key_path}` (fingerprint {self.key.fingerprint()})"
        if self._foreign:
            log.warning(
                "EmbeddingShaking: the resume was refused after the checkpoint's weights were loaded; the module "
                "holds weights shaken with the checkpoint's key, not with the key at %s. Recover them with the "
                "checkpoint's key file: privtune.shaking.recover_model(model, ShakeKey.load(<that file>)).",
                where,
            )
            return
        try:
            if self._tables_trained(pl_module):
                recover_model(self._model, self.key, "horizontal")
                how = "recovered horizontally (its trained shaken tables un-permuted; state 'recovered-horizontal')"
            else:
                restore_plain(self._model, self.key)
                how = "restored to the original model (state 'plain')"
            self._shook_here = False
            self._sync_label_ids(pl_module)
            log.warning("EmbeddingShaking: the run failed (%s); the model was %s.", type(exception).__name__, how)
        except Exception as err:  # noqa: BLE001 - the original exception is the one to raise
            self._save_new_key()  # the shaken model depends on it
            log.error(
                "EmbeddingShaking: the run failed (%s) and the model could not be recovered (%s: %s); it is still "
                "shaken. Its key is %s; recover it with privtune.shaking.recover_model(model, "
                "ShakeKey.load(%r), 'horizontal').",
                type(exception).__name__,
                type(err).__name__,
                err,
                where,
                self.key_path,
            )

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

    def _check_fingerprint(self, expected: str | None, source: str) -> None:
        """Refuse a resume unless the key in use is the one with fingerprint ``expected``."""
        if expected is None:
            return
        if self._unsaved:
            self._foreign = True
            raise KeyMismatchError(
                f"Resuming needs the key the checkpoint was trained with (fingerprint {expected}), but "
                f"`key_path={self.key_path!r}` does not exist; a new key would not match its shaken weights."
            )
        if self.key is not None and self.key.fingerprint() != expected:
            self._foreign = True
            raise KeyMismatchError(
                f"`key_path={self.key_path!r}` holds a different key (fingerprint {self.key.fingerprint()}) than "
                f"{source} was trained with (fingerprint {expected}); resume with the original key file."
            )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        info = checkpoint.get(CHECKPOINT_FIELD)
        if not isinstance(info, dict):
            self._foreign = True
            raise ValueError(
                f"The checkpoint has no `{CHECKPOINT_FIELD}` record: it was not saved by a run with EmbeddingShaking, "
                "so its tables are not shaken with this key. HINT: resume it without EmbeddingShaking, or load its "
                "weights into the module (not as a resume) and start a new shaken run."
            )
        # The top-level record, not the callback state: the state is found by `state_key`, which older
        # checkpoints built from the key path, so a resume under another path never reached its check.
        self._check_fingerprint(info.get("key_fingerprint"), "the checkpoint")
        weights = info.get("weights", "shaken")
        if (weights == "plain" or weights.startswith("recovered-")) and self.active:
            # The live model was shaken at setup, then loaded from the checkpoint: the tables the checkpoint
            # held (recovered, or plain after a failed run) must be shaken again; tables it did not hold (e.g.
            # frozen ones a module leaves out of its checkpoints) are still the shaken ones from setup.
            mode = "full" if weights == "plain" else weights.removeprefix("recovered-")
            live = pl_module.state_dict(keep_vars=True)
            names = shaken_parameter_names(self._model, pl_module)
            saved = checkpoint.get("state_dict", {})
            loaded = {n: live[n].detach().clone() for group in names.values() for n in group if n in saved}
            self._rewrite(loaded, pl_module, "shake", mode)
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
        self._check_fingerprint(state_dict.get("fingerprint"), "the checkpoint")


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return None
    return np.random.get_state()


def _set_numpy_state(state: Any) -> None:
    if state is not None:
        import numpy as np

        np.random.set_state(state)


__all__ = ["EmbeddingShaking", "KeyMismatchError", "UnreadableBatchError", "find_hf_model", "hf_model_candidates"]
