"""What each privacy callback needs from the LightningModule, the Trainer and the batches, as ``Protocol``s.

A callback attached to someone else's project checks its Protocol in ``setup`` and refuses, naming the
attribute, the option that sets it and the docs, instead of failing later (or, worse, protecting less than
asked). Torch only: the core never imports lightning.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn


# ---------------------------------------------------------------------------------------------- shaking
@runtime_checkable
class ShakeableModel(Protocol):
    """A Hugging Face model that :class:`~privtune.callbacks.EmbeddingShaking` can shake (docs/shaking.md).

    ``get_input_embeddings()`` must return an ``nn.Embedding`` ``[V, d]`` (the table that is shaken; an LM head,
    found by the model family, is shaken too) and ``config`` records the shaking state. A peft wrapper around
    such a model qualifies. The LightningModule must hold exactly one such model (frozen teachers included),
    or name it with the callback's ``model_attr``.
    """

    config: Any

    def get_input_embeddings(self) -> nn.Module: ...


@runtime_checkable
class ShakingModule(Protocol):
    """The optional parts of a LightningModule that :class:`~privtune.callbacks.EmbeddingShaking` reads.

    * ``tokenizer``: its ``all_special_ids`` are pinned (kept fixed) by a new key with ``pin="special"``;
    * ``label_token_ids``: a ``LongTensor`` of label-word ids (decoder classifiers), mapped to shaken ids while
      the model is shaken (the datamodule's ``label_token_ids`` is preferred when it has one).

    Neither is required; the model itself is found as :class:`ShakeableModel` (``model_attr``).
    """

    def named_modules(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class TokenBatch(Protocol):
    """A batch :class:`~privtune.callbacks.EmbeddingShaking` can map: indexable by ``batch_key``.

    A mapping (``dict``, ``BatchEncoding``) with the token ids under ``batch_key`` (default ``"input_ids"``) and
    optional token-level labels under ``labels_key``; or a list/tuple with the ids at the integer
    ``batch_key``. Any other batch needs ``ids_getter``. A batch that does not fit is refused.
    """

    def __getitem__(self, key: Any) -> Any: ...


@runtime_checkable
class ShakingKeyUser(Protocol):
    """A LightningModule that needs the shaking key (``privtune.modules.ShakeRecovery``, key implantation).

    :class:`~privtune.callbacks.EmbeddingShaking` calls ``attach_shaking_key(key, maps_batches)`` in its ``setup``,
    which Lightning runs before the module's own; the module never searches the Trainer's callbacks. It raises
    ``ValueError`` when it cannot work with the callback as configured (e.g. it maps batches itself and needs
    ``shake_batches: false``).
    """

    def attach_shaking_key(self, key: Any, maps_batches: bool) -> None: ...


# ---------------------------------------------------------------------------------------------- federated runs
@runtime_checkable
class FederatedAware(Protocol):
    """A callback that declares how it acts in a federated run (``privtune.strategies.FederatedSimulation`` and
    ``FederatedDDP``; docs/federated.md, "Callbacks in a federated run").

    The federated Strategies train every client inside the round loop of ``privtune.federated.loop``, so a
    callback's batch and gradient hooks never see a client's batches or gradients: they see one tick per round.
    A callback that overrides such a hook and does not declare itself is refused at set-up.

    * ``federated_support = "run"``: valid in a federated run; it acts on the run as a whole (set-up, fit end,
      checkpoints) and its batch hooks accept one tick per round.
    * ``federated_support = "refuse"``: refused at set-up; ``federated_alternative`` says what to use instead.
    """

    federated_support: str
    federated_alternative: str


# ---------------------------------------------------------------------------------------------- offsite-tuning
@runtime_checkable
class BlockModel(Protocol):
    """The model at a callback's ``model_attr`` (default ``model``): a Hugging Face transformer whose block list
    :func:`privtune.models.get_blocks` finds (Llama/Mistral/Qwen, GPT-2, OPT, BERT families; docs/offsite_tuning.md).

    Read by :class:`~privtune.callbacks.RankCompression` (its linears), :class:`~privtune.callbacks.LayerReplace`
    and :class:`~privtune.callbacks.EmulatorExport` (its blocks) and :class:`~privtune.callbacks.PlugAdapters`.
    """

    config: Any

    def named_modules(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class HarmonizerStage1Module(Protocol):
    """A ScaleOT stage-1 LightningModule (e.g. ``privtune.modules.HarmonizerImportance``), read by
    :class:`~privtune.callbacks.LayerReplace` and :class:`~privtune.callbacks.EmulatorExport`.

    Besides the model at ``model_attr``: ``model_name`` (recorded in the emulator plan), ``harmonizers``, an
    ``nn.ModuleDict`` that ``LayerReplace`` fills with one harmonizer per candidate block (keys: block indices),
    and ``layer_importance``, the candidates' scores that ``LayerReplace`` mirrors into the module.
    """

    model_name: str
    harmonizers: nn.ModuleDict
    layer_importance: Any


@runtime_checkable
class EmulatorModule(Protocol):
    """A LightningModule that builds its own emulator (``privtune.modules.EmulatorDistillation``), exported by
    :class:`~privtune.callbacks.EmulatorExport`: ``emulator`` (may be ``None`` until the module's ``setup``),
    its ``plan`` and the ``original`` model it was built from."""

    emulator: Any
    plan: Any
    original: Any


@runtime_checkable
class AdapterSource(Protocol):
    """A data-owner LightningModule (``privtune.modules.OffsiteFinetune``) read by
    :class:`~privtune.callbacks.AdapterExport`: the emulator ``plan`` and ``adapter_state()``, the adapter tensors
    keyed ``"<original block index>.<param>"``."""

    plan: Any

    def adapter_state(self) -> Any: ...


#: Keys :class:`~privtune.callbacks.TuningReport` reads from each ``evaluate()`` result.
EVALUATE_KEYS = ("acc", "f1", "n")


@runtime_checkable
class Evaluator(Protocol):
    """A LightningModule that :class:`~privtune.callbacks.TuningReport` evaluates before and after fit:
    ``evaluate(dataloader, desc=...)`` returns a mapping with at least :data:`EVALUATE_KEYS` (accuracy in
    ``[0, 1]``, macro-F1, example count), as ``privtune.modules.TextClassifier`` does."""

    def evaluate(self, dataloader: Any, desc: str = "") -> Any: ...


# ---------------------------------------------------------------------------------------------- DP-SGD
@runtime_checkable
class IndexableDataset(Protocol):
    """The training dataset :class:`~privtune.callbacks.OpacusDP` Poisson-samples (docs/dp_sgd.md): a map-style
    dataset with ``__len__`` (``N``, for ``q = B / N``) and ``__getitem__`` (examples drawn by index). An
    ``IterableDataset`` does not qualify; the refusal says how to build or wrap the loader."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...  # noqa: ANN401 - one example, whatever the collate takes


# ---------------------------------------------------------------------------------------------- privacy audit
@runtime_checkable
class MembershipAuditable(Protocol):
    """The optional parts of a LightningModule that :class:`~privtune.callbacks.MembershipAudit` reads
    (docs/privacy_audit.md); the model itself is the ``nn.Module`` at the callback's ``model_attr``.

    * ``label_token_ids``: a ``LongTensor`` of label-word ids (decoder classifiers): the audit then scores the
      gold label word's loss (``task="label_word"``); ``None`` on an encoder classifier (its head is scored);
    * ``tokenizer``: decodes examples for the zlib attack (without it that attack is skipped).
    """

    def named_modules(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class HeldOutDataModule(Protocol):
    """A datamodule :class:`~privtune.callbacks.MembershipAudit` audits: ``train_dataloader()`` (its dataset and
    ``collate_fn`` give the members) and ``<nonmember_split>_dataloader()`` (``test`` or ``val``, the held-out
    non-members of the same distribution), map-style datasets with ``__len__``. Without one, give the callback
    ``member_dataloader`` and ``nonmember_dataloader``."""

    def train_dataloader(self) -> Any: ...


def protocol_members(protocol: type) -> list[str]:
    """The attribute and method names a ``Protocol`` declares (its own and its bases'), in declaration order."""
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls is object or cls.__name__ in ("Protocol", "Generic"):
            continue
        methods = [name for name, member in vars(cls).items() if callable(member)]
        for name in [*getattr(cls, "__annotations__", {}), *methods]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return names


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (empty: it satisfies the Protocol's shape)."""
    return [name for name in protocol_members(protocol) if not hasattr(obj, name)]


def conforms(obj: object, protocol: type) -> bool:
    """Whether ``obj`` has every member ``protocol`` declares, looked up as attribute access does (``hasattr``).

    Use it instead of ``isinstance`` for a Protocol with data members: from Python 3.12, ``isinstance`` against a
    runtime-checkable Protocol looks members up statically (``inspect.getattr_static``) and does not see what an
    ``nn.Module`` keeps in ``_modules``, ``_parameters`` and ``_buffers``, so a LightningModule holding the model,
    harmonizers or score buffer a contract names would be refused on 3.12 and accepted on 3.11.
    """
    return not missing_members(obj, protocol)


class ContractError(TypeError):
    """A callback's module, trainer or batch does not provide what the callback's Protocol names."""


def model_at(owner: object, model_attr: str, who: str, docs: str) -> nn.Module:
    """``getattr(owner, model_attr)`` when it is an ``nn.Module``.

    Raises:
        ContractError: naming ``model_attr``, the module's sub-modules it could name instead, and ``docs``.
    """
    model = getattr(owner, model_attr, None)
    if isinstance(model, nn.Module):
        return model
    modules = getattr(owner, "_modules", {}) or {}
    found = getattr(model, "__class__", type(None)).__name__ if hasattr(owner, model_attr) else "no such attribute"
    raise ContractError(
        f"{who}: `model_attr={model_attr!r}` names no model on {type(owner).__name__} ({found}); it must name the "
        f"attribute that holds the model, one of {sorted(modules)}. HINT: set `model_attr` (see {docs})."
    )
