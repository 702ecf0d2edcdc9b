"""The federated round loop shared by the in-process and the DDP Strategy.

One round (FedPepTAO, arXiv 2310.15080, spec §5-§7, and the baselines of spec §12):

1. plan: sample ``M`` clients (seeded by ``(seed, round)``), drop some, slow some down;
2. each rank trains the reporting clients assigned to it (``j % world_size == rank`` in sampling order):
   the client's full local prefix with the selected layers (and an encoder's head) overwritten by the global value,
   local AdamW steps, FedProx / SCAFFOLD gradient terms where configured; upload the selected slices;
3. the uploads and the new client states are gathered on every rank, in sampling order, and every rank runs the
   same pure server step (:mod:`privtune.federated`), so all ranks hold the same global state;
4. accounting (bytes up/down, slowest-client time) and personalised evaluation (each client's local prefix with
   the global slices, predictions pooled over clients).

The runner's state (global tensors, server optimizer, every client's prompt / optimizer / control variate, the
ledger, the history and the partial results of an unfinished round) goes into the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from privtune.federated.accounting import CommLedger
from privtune.federated.aggregate import ClientUpdate, State
from privtune.federated.client import ClientState, ClientStore, local_update
from privtune.federated.fedpeptao import FedPepTAOServer
from privtune.federated.sampling import RoundPlan, client_seed, plan_round
from privtune.federated.scaffold import DELTA_C, Scaffold, client_control_variate
from privtune.prompts.layer_selection import (
    aggregate_layer_scores,
    client_layer_scores,
    hessian_ratio,
    num_layers_from_ratio,
    rank_layers,
    select_layers,
)
from privtune.strategies.config import FederatedConfig

Gather = Callable[[Any], list[Any]]


class FederatedRunner:
    """Runs federated rounds over a :class:`~privtune.modules.prompt_tuning.PromptTuning` module.

    Args:
        config: the run's :class:`FederatedConfig`.
    """

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.round = 0
        self.selected: list[int] = []
        self.layer_scores: list[float] = []
        self.ratio: float | None = None
        self.global_state: State = {}
        self.server = None
        self.store: ClientStore | None = None
        self.ledger = CommLedger()
        self.history: list[dict[str, Any]] = []
        self.pending: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self.on_client_end: Callable[[int, int], None] | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, module: Any, datamodule: Any) -> None:
        """Check the data, choose the layers, build the server and the client store (before any training).

        Raises:
            ValueError: if the datamodule is not client-partitioned or the layer choice does not fit the model.
        """
        cfg = self.config
        missing = [
            m for m in ("client_train_loader", "client_eval_loader", "num_clients") if not hasattr(datamodule, m)
        ]
        if missing:
            raise ValueError(
                f"The federated Strategy needs a client-partitioned datamodule (privtune.datamodules.federated."
                f"FederatedDataModule); `{type(datamodule).__name__}` lacks {missing}."
            )
        datamodule.num_rounds = cfg.num_rounds
        self.num_clients = datamodule.num_clients
        num_layers = module.prompt.num_layers
        if cfg.layers == "list":
            bad = [i for i in cfg.selected_layers or [] if not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"`selected_layers` has {bad} outside the model's {num_layers} prompt layers (0..{num_layers - 1})."
                )
        if cfg.num_selected_layers is not None and cfg.num_selected_layers > num_layers:
            raise ValueError(
                f"`num_selected_layers={cfg.num_selected_layers}` exceeds the model's {num_layers} prompt layers."
            )
        module.configure_labels(datamodule.label_token_ids, datamodule.num_classes, datamodule.label_names)
        if self._restored is not None:
            self.load_state_dict(self._restored)
            self._restored = None
            return
        self.server = cfg.build_server(self.num_clients)
        self.local = cfg.local_config(self.server)
        self.selected = self._choose_layers(module, datamodule)
        self.store = ClientStore(initial_prompt=module.prompt.weight.detach().clone())
        self.global_state = self._communicated(module)

    def _choose_layers(self, module: Any, datamodule: Any) -> list[int]:
        cfg = self.config
        num_layers = module.prompt.num_layers
        if cfg.layers == "all":
            return list(range(num_layers))
        if cfg.layers == "list":
            return list(cfg.selected_layers or [])
        # FedPepTAO: score every client's first mini-batch of `scoring_batch_size` examples, weighted by n_k
        module.train()
        scores, sizes = [], []
        for client in range(self.num_clients):
            batch = _first_batch(datamodule.client_train_loader(client, cfg.seed), cfg.scoring_batch_size)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(client_seed(cfg.seed, 0, client))
                scores.append(client_layer_scores(module.hidden_states(batch)))
            sizes.append(datamodule.client_num_examples(client))
        total = aggregate_layer_scores(scores, sizes)
        self.layer_scores = [float(s) for s in total]
        ranking = rank_layers(total)
        if cfg.num_selected_layers is not None:
            k = cfg.num_selected_layers
        elif cfg.selection_ratio is not None:
            self.ratio = cfg.selection_ratio
            k = num_layers_from_ratio(cfg.selection_ratio, num_layers)
        else:
            self.ratio = self._slq_ratio(module, datamodule)
            k = num_layers_from_ratio(self.ratio, num_layers)
        return select_layers(ranking, k)

    def _slq_ratio(self, module: Any, datamodule: Any) -> float:
        """Mean SLQ ratio over round-1 sampled clients (the code warms up 10 FedAvg rounds first; see docs)."""
        cfg = self.config
        plan = plan_round(1, self.num_clients, cfg.sample_fraction, cfg.seed)
        param = module.prompt.weight
        ratios = []
        for client in plan.sampled:
            batch = _first_batch(datamodule.client_train_loader(client, cfg.seed), cfg.scoring_batch_size)

            def loss(batch: dict[str, Tensor] = batch, client: int = client) -> Tensor:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(client)
                    return module.client_loss(batch)

            ratios.append(hessian_ratio(loss, param, num_iters=cfg.slq_iterations, seed=client))
        return float(sum(ratios) / len(ratios))

    # ------------------------------------------------------------------ what is communicated
    def _communicated(self, module: Any) -> State:
        state = {"prefix": module.prompt.weight.detach()[:, self.selected].clone()}
        for name, p in module.client_parameters().items():
            if name != "prefix":
                state[name] = p.detach().clone()
        return state

    def elements_per_client(self) -> int:
        """Elements of the communicated state (per client, per direction)."""
        return sum(t.numel() for t in self.global_state.values())

    def _load_client(self, module: Any, state: ClientState) -> None:
        params = module.client_parameters()
        with torch.no_grad():
            params["prefix"].copy_(state.prompt)
            params["prefix"][:, self.selected] = self.global_state["prefix"]
            for name, value in self.global_state.items():
                if name != "prefix":
                    params[name].copy_(value)

    # ------------------------------------------------------------------ one client
    def train_client(
        self, module: Any, datamodule: Any, client: int, plan: RoundPlan
    ) -> tuple[ClientUpdate, ClientState]:
        """Local training of one client; returns its upload and its new state."""
        cfg = self.config
        start = time.perf_counter()
        state = self.store.get(client)
        self._load_client(module, state)
        params = module.client_parameters()
        names = list(params)
        seed = client_seed(cfg.seed, self.round + 1, client)
        loader = datamodule.client_train_loader(client, seed)
        max_steps = None
        if client in plan.stragglers:
            full = len(loader) * cfg.local_epochs
            if cfg.local_max_steps:
                full = min(full, cfg.local_max_steps)
            max_steps = max(1, math.floor(cfg.straggler_steps_fraction * full))
        global_state = self.global_state
        scaffold = isinstance(self.server, Scaffold)
        c_global = self.server.control_variate(global_state) if scaffold else None
        c_i = state.control_variate or {k: torch.zeros_like(v) for k, v in global_state.items()}

        def communicated_view(name: str, t: Tensor) -> Tensor:
            return t[:, self.selected] if name == "prefix" else t

        def grad_hook(ps: list[Tensor]) -> None:
            with torch.no_grad():
                for name, p in zip(names, ps):
                    if p.grad is None:
                        continue
                    g = communicated_view(name, p.grad)
                    if cfg.server == "fedprox" and cfg.mu > 0:
                        g += cfg.mu * (communicated_view(name, p.detach()) - global_state[name])
                    if scaffold:
                        g += c_global[name] - c_i[name]
                    if name == "prefix":
                        p.grad[:, self.selected] = g

        module.train()
        optimizer_state = None if state.optimizer is None else state.optimizer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            steps, optimizer_state = local_update(
                [params[n] for n in names],
                loader,
                module.client_loss,
                self.local,
                optimizer_state=optimizer_state,
                grad_hook=grad_hook if (scaffold or cfg.server == "fedprox") else None,
                max_steps=max_steps,
            )
        upload = self._communicated(module)
        extras: State = {}
        new_cv = state.control_variate
        if scaffold:
            new_cv = client_control_variate(c_i, c_global, global_state, upload, steps, self.server.eta_l)
            extras = {DELTA_C + k: new_cv[k] - c_i[k] for k in new_cv}
        new_state = ClientState(
            prompt=params["prefix"].detach().clone(),
            optimizer=copy.deepcopy(optimizer_state),
            control_variate=new_cv,
            rounds=state.rounds + 1,
        )
        update = ClientUpdate(
            client_id=client,
            state=upload,
            num_examples=datamodule.client_num_examples(client),
            num_steps=steps,
            seconds=time.perf_counter() - start,
            extras=extras,
        )
        return update, new_state

    # ------------------------------------------------------------------ one round
    def run_round(self, module: Any, datamodule: Any, rank: int, world_size: int, gather: Gather) -> dict[str, float]:
        """Run the next round; returns the metrics to log (empty once every round is done)."""
        cfg = self.config
        if self.round >= cfg.num_rounds:
            return {}
        r = self.round + 1
        plan = plan_round(
            r, self.num_clients, cfg.sample_fraction, cfg.seed, cfg.dropout_fraction, cfg.straggler_fraction
        )
        if self.pending is None or self.pending["round"] != r:
            self.pending = {"round": r, "updates": {}, "states": {}}
        mine = [c for j, c in enumerate(plan.reporting) if j % world_size == rank]
        for client in mine:
            if client in self.pending["updates"]:
                continue  # trained before an interruption; its result is in the checkpoint
            update, new_state = self.train_client(module, datamodule, client, plan)
            self.pending["updates"][client] = update
            self.pending["states"][client] = new_state
            if self.on_client_end is not None:
                self.on_client_end(r, client)
        mine_results = {c: (self.pending["updates"][c], self.pending["states"][c]) for c in mine}
        merged: dict[int, tuple[ClientUpdate, ClientState]] = {}
        for part in gather(mine_results):
            merged.update(part)
        updates = [merged[c][0] for c in plan.reporting]
        self.global_state = self.server.step(self.global_state, updates)
        for c in plan.reporting:
            self.store.put(c, merged[c][1])
        rec = self.ledger.record(
            r,
            plan.sampled,
            plan.reporting,
            self.elements_per_client(),
            {u.client_id: u.seconds for u in updates},
            factor=self.server.bytes_factor,
        )
        self.round = r
        self.pending = None
        metrics: dict[str, float] = {
            "round": float(r),
            "comm/up_bytes": float(rec.up_bytes),
            "comm/down_bytes": float(rec.down_bytes),
            "comm/cum_up_bytes": float(self.ledger.total_up_bytes),
            "comm/cum_down_bytes": float(self.ledger.total_down_bytes),
            "comm/num_transfer_params": float(rec.num_transfer_params),
            "time/round_seconds": rec.round_seconds,
            "time/serial_seconds": rec.serial_seconds,
            "clients/reported": float(len(plan.reporting)),
        }
        if isinstance(self.server, FedPepTAOServer):
            metrics.update(self.server.diagnostics)
        if r % cfg.eval_every == 0 or r == cfg.num_rounds:
            metrics["fed/personalized_acc"] = self.evaluate(module, datamodule, rank, world_size, gather)
        self.history.append(dict(metrics))
        return metrics

    @torch.no_grad()
    def evaluate(self, module: Any, datamodule: Any, rank: int, world_size: int, gather: Gather) -> float:
        """Personalised accuracy: every client's local prefix with the global slices, pooled over clients."""
        module.eval()
        correct = total = 0
        for client in range(rank, self.num_clients, world_size):
            loader = datamodule.client_eval_loader(client)
            if len(loader.dataset) == 0:
                continue
            self._load_client(module, self.store.get(client))
            for batch in loader:
                preds = module.predict(batch)
                correct += int((preds == batch["labels"]).sum())
                total += int(batch["labels"].numel())
        module.train()
        parts = gather((correct, total))
        c, t = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return c / max(t, 1)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, mid-round included."""
        return {
            "round": self.round,
            "selected": self.selected,
            "layer_scores": self.layer_scores,
            "ratio": self.ratio,
            "global_state": self.global_state,
            "server": self.server.state_dict() if self.server is not None else None,
            "server_name": self.config.server,
            "store": self.store.state_dict() if self.store is not None else None,
            "ledger": self.ledger.state_dict(),
            "history": self.history,
            "pending": _pending_to_plain(self.pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (needs :meth:`setup`'s server and store to exist, or builds them)."""
        if self.server is None:
            self.server = self.config.build_server(self.num_clients)
            self.local = self.config.local_config(self.server)
        if self.store is None:
            self.store = ClientStore(initial_prompt=state["store"]["initial_prompt"])
        self.round = int(state["round"])
        self.selected = list(state["selected"])
        self.layer_scores = list(state["layer_scores"])
        self.ratio = state["ratio"]
        self.global_state = state["global_state"]
        self.server.load_state_dict(state["server"])
        self.store.load_state_dict(state["store"])
        self.ledger.load_state_dict(state["ledger"])
        self.history = list(state["history"])
        self.pending = _pending_from_plain(state["pending"])

    def restore_later(self, state: dict[str, Any]) -> None:
        """Keep a checkpointed state to load at :meth:`setup` (Lightning loads checkpoints before set-up ends)."""
        self._restored = state


def _pending_to_plain(pending: dict[str, Any] | None) -> dict[str, Any] | None:
    if pending is None:
        return None
    return {
        "round": pending["round"],
        "updates": {c: dataclasses.asdict(u) for c, u in pending["updates"].items()},
        "states": {c: s.to_dict() for c, s in pending["states"].items()},
    }


def _pending_from_plain(pending: dict[str, Any] | None) -> dict[str, Any] | None:
    if pending is None:
        return None
    return {
        "round": pending["round"],
        "updates": {int(c): ClientUpdate(**u) for c, u in pending["updates"].items()},
        "states": {int(c): ClientState.from_dict(s) for c, s in pending["states"].items()},
    }


def _first_batch(loader: Any, size: int) -> dict[str, Tensor]:
    """The first ``size`` examples of a client's loader, padded together."""
    items = [loader.dataset[i] for i in range(min(size, len(loader.dataset)))]
    return loader.collate_fn(items)
