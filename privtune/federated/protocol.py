"""What the federated round loop needs from a client model and from the client-partitioned data.

The round loop (:mod:`privtune.federated.loop`) is plain PyTorch. It drives any object that satisfies
:class:`FederatedClient`; FedPepTAO's partial prompt tuning (Che et al., EMNLP 2023, arXiv 2310.15080) also needs
:class:`PartialPromptClient` (a prompt tensor split by layer, and the hidden states for layer scoring). The
Lightning module :class:`privtune.modules.prompt_tuning.PromptTuning` implements both; a Flower ``ClientApp`` or a
user's own loop can pass any other object with these members.

Threat model: the loop sends exactly the tensors named by :meth:`FederatedClient.client_parameters` (or, for a
partial prompt, the selected layers' slices of it); nothing else of the client leaves it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

DOCS = "docs/federated.md#the-client-protocol"


@runtime_checkable
class FederatedClient(Protocol):
    """A client model the round loop can train, send and evaluate.

    Members:
        client_parameters: the trainable tensors by name; the loop trains exactly these and communicates them
            (a partial prompt's layered tensor only in part, see :class:`PartialPromptClient`).
        client_loss: a scalar training loss on one batch of the client's data (differentiable in those tensors).
        evaluate_batch: ``(correct, total)`` on one evaluation batch (no gradient).
        train / eval: switch dropout on and off (``torch.nn.Module`` provides both).
    """

    def client_parameters(self) -> Mapping[str, Tensor]: ...

    def client_loss(self, batch: Any) -> Tensor: ...

    def evaluate_batch(self, batch: Any) -> tuple[int, int]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


@runtime_checkable
class PartialPromptClient(FederatedClient, Protocol):
    """A client whose prompt is split by layer, for FedPepTAO's partial prompt tuning (spec §4).

    Members:
        prompt_name: the entry of :meth:`client_parameters` that holds the deep prefix ``[P, L, ...]`` (layers on
            axis 1); only the selected layers' slices of it are communicated, the others stay on the client.
        num_prompt_layers: ``L``.
        hidden_states: all layer outputs of a batch (index 0 = embeddings), for the layer scores.
    """

    prompt_name: str

    @property
    def num_prompt_layers(self) -> int: ...

    def hidden_states(self, batch: Any) -> Sequence[Tensor]: ...


@runtime_checkable
class ClientData(Protocol):
    """Client-partitioned data (``privtune.datamodules.federated.FederatedDataModule`` implements it).

    Members:
        num_clients: ``N``.
        client_train_loader: the client's training batches in an order fixed by ``seed``.
        client_eval_loader: the client's evaluation batches (personalised evaluation).
        client_num_examples: ``n_k``, the aggregation weight.
    """

    num_clients: int

    def client_train_loader(self, client_id: int, seed: int) -> Iterable[Any]: ...

    def client_eval_loader(self, client_id: int) -> Iterable[Any]: ...

    def client_num_examples(self, client_id: int) -> int: ...


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks, in declaration order."""
    names: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        for name in list(getattr(klass, "__annotations__", {})) + [
            n for n, v in vars(klass).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))
        ]:
            if name not in names:
                names.append(name)
    return [n for n in names if not hasattr(obj, n)]


def check_client(obj: Any, partial: bool) -> None:
    """Raise ``TypeError`` naming every member of the client Protocol that ``obj`` lacks.

    Args:
        obj: the client model.
        partial: FedPepTAO's layer selection is configured (``layers`` is not ``all``), so the layered prompt
            members are needed too.
    """
    protocol = PartialPromptClient if partial else FederatedClient
    missing = missing_members(obj, protocol)
    if missing:
        why = " (the `layers` option selects prompt layers)" if partial else ""
        raise TypeError(
            f"The federated loop needs a client model implementing `{protocol.__name__}`{why}; "
            f"`{type(obj).__name__}` lacks {missing}. See {DOCS}."
        )


def check_data(obj: Any) -> None:
    """Raise ``ValueError`` naming what a client-partitioned datamodule lacks."""
    missing = missing_members(obj, ClientData)
    if missing:
        raise ValueError(
            f"The federated Strategy needs a client-partitioned datamodule (privtune.datamodules.federated."
            f"FederatedDataModule, or any object implementing `ClientData`); `{type(obj).__name__}` lacks {missing}."
        )
