"""Conversions between privtune's round-loop values and Flower's Message records (flwr 1.42 Message API).

* named tensors (:data:`~privtune.federated.aggregate.State`) <-> ``ArrayRecord`` (float32 NumPy arrays, the names
  kept, the order kept);
* a client's persistent :class:`~privtune.federated.client.ClientState` <-> bytes in a ``ConfigRecord`` of the
  ClientApp's ``context.state`` (``torch.save`` of plain tensors and containers, read back with
  ``weights_only=True``);
* :class:`~privtune.federated.client.LocalConfig` <-> ``ConfigRecord``.

Threat model: these records are exactly what crosses the wire (``ArrayRecord`` contents) or stays on the node
(``context.state``); nothing else is added.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import Tensor

from privtune.federated.aggregate import State
from privtune.federated.client import ClientState, LocalConfig


def to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """``state`` as an ``ArrayRecord`` (detached CPU copies)."""
    return ArrayRecord.from_torch_state_dict({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    """An ``ArrayRecord`` as named tensors owning their memory."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def client_state_to_bytes(state: ClientState) -> bytes:
    """A client's persistent state, serialised with ``torch.save`` (plain tensors and containers only)."""
    buffer = io.BytesIO()
    torch.save(state.to_dict(), buffer)
    return buffer.getvalue()


def client_state_from_bytes(data: bytes) -> ClientState:
    """Inverse of :func:`client_state_to_bytes`, loaded with ``weights_only=True``."""
    return ClientState.from_dict(torch.load(io.BytesIO(data), weights_only=True))


def local_config_to_record(config: LocalConfig) -> ConfigRecord:
    """The resolved local optimisation settings the server sends every round."""
    values = dataclasses.asdict(config)
    values["betas"] = [float(b) for b in values["betas"]]
    return ConfigRecord(values)


def local_config_from_record(record: ConfigRecord) -> LocalConfig:
    """Inverse of :func:`local_config_to_record`."""
    fields = {f.name for f in dataclasses.fields(LocalConfig)}
    values = {k: v for k, v in record.items() if k in fields}
    values["betas"] = tuple(values["betas"])
    return LocalConfig(**values)
