"""Membership inference against a federated run: the global model and the personalised models.

Privacy audit (docs/privacy_audit.md; attacks of :mod:`privtune.attacks.membership`). Members are training examples
of the clients that took part in at least one round; non-members are held-out examples of the same distribution
(the clients' evaluation splits, which no client trained on), equal in number, disjoint, drawn by seed. Each example
is scored by its loss under the attacked model (Yeom et al. 2018's loss attack; for the label-word and label-name
classifiers of prompt tuning this is the label-word loss):

* **global**: the global model alone (the initial prompt with the global slices), the artefact the server, every
  client and anyone it is shared with holds;
* **personalised**: each example scored by the personalised model of the client it belongs to (its own prompt with
  the global slices), the model a client deploys.

The report is :func:`privtune.attacks.membership.membership_report`'s (ROC AUC and TPR at 1 % / 0.1 % FPR with
bootstrap 95 % intervals, and the negative control: non-members against non-members).

Threat model: an attacker who can query the released model (global or a client's personalised one) and holds
candidate examples; it does not see updates or the training stream. Client-level DP bounds what the global model
reveals about a whole client; it does not make this attack's AUC 0.5 by construction, which is why it is measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from privtune.attacks.membership import ExampleStatistics, membership_report

if TYPE_CHECKING:
    from privtune.federated.loop import FederatedLoop


def _examples(loader: Any) -> list[Any]:
    """The loader's examples one by one (a ``DataLoader``'s dataset), in dataset order."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(loader, "collate_fn"):
        raise TypeError(
            "The federated membership audit scores examples one by one and needs the client loaders to be "
            "`torch.utils.data.DataLoader`s (a `dataset` and a `collate_fn`)."
        )
    return [dataset[i] for i in range(len(dataset))]


@torch.no_grad()
def _losses(loop: FederatedLoop, items: Sequence[tuple[int, Any]], collate: Any, personalised: bool) -> np.ndarray:
    """Per-example loss of ``(client id, example)`` pairs under the global or each client's personalised model."""
    client, _, store, _ = loop._ready()
    client.eval()
    params = client.client_parameters()
    out = np.empty(len(items))
    loaded: int | None = None
    order = sorted(range(len(items)), key=lambda i: items[i][0]) if personalised else list(range(len(items)))
    if not personalised:
        loop.view.load(params, store.initial_prompt, loop.global_state)
    for i in order:
        cid, example = items[i]
        if personalised and cid != loaded:
            loop.view.load(params, store.get(cid).prompt, loop.global_state)
            loaded = cid
        out[i] = float(client.client_loss(collate([example])))
    client.train()
    return out


def federated_membership(loop: FederatedLoop, max_examples: int = 200, seed: int = 0, draws: int = 1000) -> dict:
    """Membership reports of the global and the personalised models after ``loop``'s rounds.

    Args:
        loop: a set-up :class:`~privtune.federated.loop.FederatedLoop` that has run its rounds (in this process).
        max_examples: at most this many members and as many non-members (equal numbers, drawn by ``seed``).
        seed: draws the example sets, the bootstrap and the negative control's halves.
        draws: bootstrap resamples.

    Returns:
        ``{"global": report, "personalised": report, "n_members", "n_nonmembers", "participants"}`` (plain data).

    Raises:
        ValueError: if no client has trained yet or fewer than 2 examples are on either side.
    """
    client, data, store, _ = loop._ready()
    participants = sorted(store.clients)
    if not participants:
        raise ValueError("The federated membership audit needs a run in which at least one client trained.")
    members: list[tuple[int, Any]] = []
    nonmembers: list[tuple[int, Any]] = []
    collate = None
    for cid in participants:
        loader = data.client_train_loader(cid, loop.config.seed)
        collate = collate or loader.collate_fn  # type: ignore[attr-defined]
        members += [(cid, x) for x in _examples(loader)]
    for cid in range(loop.num_clients):
        nonmembers += [(cid, x) for x in _examples(data.client_eval_loader(cid))]
    n = min(max_examples, len(members), len(nonmembers))
    if n < 2:
        raise ValueError(
            f"The federated membership audit needs >= 2 members and non-members; this run has {len(members)} "
            f"training examples of participating clients and {len(nonmembers)} held-out examples."
        )
    rng = np.random.default_rng(seed)
    members = [members[i] for i in sorted(rng.choice(len(members), n, replace=False))]
    nonmembers = [nonmembers[i] for i in sorted(rng.choice(len(nonmembers), n, replace=False))]
    out: dict[str, Any] = {"n_members": n, "n_nonmembers": n, "participants": len(participants)}
    kinds: Iterable[tuple[str, bool]] = [("global", False)]
    if loop.view.prompt_name is not None and loop.config.personal_layers:
        kinds = [("global", False), ("personalised", True)]
    for name, personalised in kinds:
        stats_in = ExampleStatistics(loss=_losses(loop, members, collate, personalised))
        stats_out = ExampleStatistics(loss=_losses(loop, nonmembers, collate, personalised))
        report = membership_report(stats_in, stats_out, draws=draws, seed=seed, meta={"model": name})
        out[name] = report.to_dict()
    return out
