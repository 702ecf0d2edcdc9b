"""Map the token ids of a training batch to shaken ids, or refuse a batch that cannot be read.

CypherTalk (arXiv 2403.07283): the cloud must see only ``pi(x)``. A batch whose ids are left plain while the
model is shaken trains a broken model and, in a split deployment, shows the cloud the plain ids; so a batch
that cannot be read is an error, never skipped. :class:`BatchIds` says where the ids (and token-level labels)
are: a key of a mapping (``dict``, ``BatchEncoding``), an index of a list/tuple, or a getter.

Threat model: runs on the key holder's side (it holds the key); it never logs ids or the key.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from privtune.shaking.key import ShakeKey

#: ``labels_key`` default: ``"labels"`` of a mapping; for list/tuple batches an explicit index or ``None``.
AUTO = "auto"
DOCS = "docs/shaking.md (Batches)"


class UnreadableBatchError(ValueError):
    """A batch whose token ids cannot be found where :class:`BatchIds` says they are."""


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {sorted(map(str, batch))}"
    if isinstance(batch, (list, tuple)):
        kinds = [
            f"{type(x).__name__}{list(x.shape) if isinstance(x, Tensor) else ''}"
            + (f" {x.dtype}" if isinstance(x, Tensor) else "")
            for x in batch
        ]
        return f"a {type(batch).__name__} of {len(batch)} ({', '.join(kinds)})"
    return f"a {type(batch).__name__}"


def _is_ids(value: Any) -> bool:
    return isinstance(value, Tensor) and not value.is_floating_point() and not value.is_complex() and value.dim() > 0


@dataclass
class BatchIds:
    """Where a batch holds its token ids and token-level labels.

    Args:
        batch_key: the key of the ids in a mapping batch (default ``"input_ids"``), or their index in a
            list/tuple batch (e.g. ``0`` for ``(input_ids, attention_mask, labels)``).
        labels_key: token-level labels mapped with the ids (same shape as the ids; ``-100`` kept). ``"auto"``:
            ``"labels"`` of a mapping when it has the ids' shape; a list/tuple batch with another integer
            tensor of the ids' shape must name it (its index) or set ``None``. ``None``: no labels are mapped.
        ids_getter: ``batch -> LongTensor``, for any other batch type; the returned tensor is mapped in place.

    Raises:
        ValueError: for a ``batch_key`` that is neither a string nor a non-negative integer.
    """

    batch_key: str | int = "input_ids"
    labels_key: str | int | None = AUTO
    ids_getter: Callable[[Any], Tensor] | None = None
    _mapped: dict[int, weakref.ref] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("batch_key", "labels_key"):
            value = getattr(self, name)
            if isinstance(value, bool) or (isinstance(value, int) and value < 0):
                raise ValueError(f"`{name}={value!r}` must be a key name or an index >= 0.")
        if self.labels_key is not None and self.labels_key != AUTO and self.labels_key == self.batch_key:
            raise ValueError(f"`labels_key={self.labels_key!r}` must differ from `batch_key={self.batch_key!r}`.")

    # ------------------------------------------------------------------ reading
    def _fail(self, batch: Any, what: str, where: str) -> UnreadableBatchError:
        hint = (
            "HINT: set `batch_key` to the key (mapping batch) or index (list/tuple batch) of the token ids, or "
            f"give `ids_getter`; see {DOCS}."
        )
        return UnreadableBatchError(
            f"EmbeddingShaking cannot read the token ids of the {where} batch ({_describe(batch)}): {what}. {hint}"
        )

    def ids(self, batch: Any, where: str = "training") -> Tensor:
        """The token-id tensor of ``batch``.

        Raises:
            UnreadableBatchError: if it is not where ``batch_key``/``ids_getter`` say, or not an integer tensor.
        """
        if self.ids_getter is not None:
            try:
                value = self.ids_getter(batch)
            except Exception as err:  # noqa: BLE001 - any failure of the user's getter is the same refusal
                raise self._fail(batch, f"`ids_getter` raised {type(err).__name__}: {err}", where) from err
            label = "`ids_getter`"
        elif isinstance(batch, Mapping):
            if not isinstance(self.batch_key, str) or self.batch_key not in batch:
                raise self._fail(batch, f"it has no key `batch_key={self.batch_key!r}`", where)
            value, label = batch[self.batch_key], f"`batch_key={self.batch_key!r}`"
        elif isinstance(batch, (list, tuple)):
            if not isinstance(self.batch_key, int):
                raise self._fail(
                    batch,
                    f"`batch_key={self.batch_key!r}` names a key, but the batch is a sequence (give an index)",
                    where,
                )
            if self.batch_key >= len(batch):
                raise self._fail(batch, f"`batch_key={self.batch_key}` is out of range", where)
            value, label = batch[self.batch_key], f"`batch_key={self.batch_key}`"
        else:
            raise self._fail(batch, "it is neither a mapping nor a list/tuple", where)
        if not _is_ids(value):
            got = f"{type(value).__name__} {getattr(value, 'dtype', '')}".strip()
            raise self._fail(batch, f"{label} gives {got}, not an integer tensor of ids", where)
        return value

    def labels_slot(self, batch: Any, ids: Tensor, where: str = "training") -> str | int | None:
        """The key/index of token-level labels to map with the ids (``None``: none).

        Raises:
            UnreadableBatchError: for a list/tuple batch with ``labels_key="auto"`` and another integer tensor
                shaped like the ids (labels or a mask: the batch must say which).
        """
        if self.ids_getter is not None and self.labels_key == AUTO:
            return None
        if isinstance(batch, Mapping):
            slot = "labels" if self.labels_key == AUTO else self.labels_key
            if slot is None:
                return None
            value = batch.get(slot) if isinstance(slot, str) else None
            if self.labels_key != AUTO and not _is_ids(value):
                raise self._fail(batch, f"`labels_key={slot!r}` is not an integer tensor in it", where)
            return slot if _is_ids(value) and value.shape == ids.shape else None
        if isinstance(batch, (list, tuple)):
            if self.labels_key == AUTO:
                alike = [
                    i
                    for i, x in enumerate(batch)
                    if i != self.batch_key and _is_ids(x) and x.shape == ids.shape and x is not ids
                ]
                if alike:
                    raise self._fail(
                        batch,
                        f"elements {alike} are integer tensors shaped like the ids (token-level labels would need "
                        f"mapping too); set `labels_key` to the labels' index, or `labels_key=None` if none are labels",
                        where,
                    )
                return None
            if self.labels_key is None:
                return None
            if (
                not isinstance(self.labels_key, int)
                or self.labels_key >= len(batch)
                or not _is_ids(batch[self.labels_key])
            ):
                raise self._fail(batch, f"`labels_key={self.labels_key!r}` is not an integer tensor in it", where)
            return self.labels_key
        return None

    def check(self, batch: Any, where: str = "training") -> None:
        """Raise :class:`UnreadableBatchError` unless :meth:`shake` can map ``batch``."""
        self.labels_slot(batch, self.ids(batch, where), where)

    # ------------------------------------------------------------------ mapping
    def _encode_in_place(self, tensor: Tensor, key: ShakeKey, batch: Any, where: str) -> None:
        # A tensor the loader keeps (no collate copy) would come back and be mapped twice: refused.
        seen = self._mapped.get(id(tensor))
        if seen is not None and seen() is tensor:
            raise self._fail(
                batch,
                "the same ids tensor arrived twice; it is mapped in place, so the data loader must yield a new "
                "tensor per batch (a collate copy), or the batch must be a mapping/list",
                where,
            )
        tensor.copy_(key.encode_ids(tensor))
        self._mapped = {i: r for i, r in self._mapped.items() if r() is not None}
        self._mapped[id(tensor)] = weakref.ref(tensor)

    def shake(self, batch: Any, key: ShakeKey, where: str = "training") -> Any:
        """Map ``batch``'s ids (and token-level labels) to shaken ids; returns the batch.

        Mutable mappings and lists get new tensors; tuple elements and ``ids_getter`` tensors are mapped in place.

        Raises:
            UnreadableBatchError: if the batch cannot be read (see :meth:`ids` and :meth:`labels_slot`).
        """
        ids = self.ids(batch, where)
        slot = self.labels_slot(batch, ids, where)
        if self.ids_getter is not None or not isinstance(batch, (MutableMapping, list)):
            self._encode_in_place(ids, key, batch, where)
            if slot is not None:
                self._encode_in_place(batch[slot], key, batch, where)
            return batch
        batch[self.batch_key] = key.encode_ids(ids)
        if slot is not None:
            batch[slot] = key.encode_ids(batch[slot])
        return batch


__all__ = ["AUTO", "BatchIds", "UnreadableBatchError"]
