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
