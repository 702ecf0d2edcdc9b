"""The federated round loop, in plain PyTorch: the one loop every driver runs.

FedPepTAO (Che et al., EMNLP 2023, arXiv 2310.15080, spec §5-§7) and its baselines (spec §12). One round:

1. plan: sample ``M`` clients (seeded by ``(seed, round)``), drop some, slow some down (:func:`plan_round`);
2. every reporting client runs :func:`local_round`: its own full prompt with the communicated part overwritten by
   the global value, local steps of its optimizer, the FedProx term (``proximal_mu``) and SCAFFOLD's drift
   correction (``server: Scaffold``) added to the gradients; it uploads the communicated tensors;
3. :meth:`FederatedLoop.aggregate`: the uploads (and the new client states) are combined in sampling order, the
   server optimizer steps, the ledger counts bytes and time. With ``client_dp`` (DP-FedAvg, McMahan et al. 2018)
   each update ``w_i - w`` is clipped, the uniform mean is noised and accounted (:mod:`privtune.federated.client_dp`)
   before the server optimizer sees it (post-processing: every server optimizer works, FedPepTAO's included), and
   the run stops before a round that would spend more than ``target_epsilon``;
4. personalised evaluation: each client's own prompt with the global part, predictions pooled over clients.

The client model only has to satisfy :class:`~privtune.federated.protocol.FederatedClient` (and
:class:`~privtune.federated.protocol.PartialPromptClient` for FedPepTAO's layer selection); the data
:class:`~privtune.federated.protocol.ClientData`. Drivers: ``privtune.strategies.FederatedSimulation`` (every client
in this process), ``privtune.strategies.FederatedDDP`` (clients split across ranks: each rank trains the reporting
clients ``j % world_size == rank`` and ``gather`` collects the results, so every rank runs the same server step),
and a Flower app (a ``ClientApp`` calls :func:`local_round`, the ``ServerApp`` calls :meth:`FederatedLoop.aggregate`).

:meth:`FederatedLoop.state_dict` holds plain tensors, numbers, strings and dicts only (it loads with
``torch.load(..., weights_only=True)``), and a fingerprint of the run (client count, server class and arguments,
layer choice, seed, sampling) that :meth:`FederatedLoop.load_state_dict` compares before resuming.

Threat model: clients exchange only the communicated named tensors with the server; personal prompt layers,
optimizer states and data stay on the client (in simulation: in the client store).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from privtune.federated.accounting import CommLedger
from privtune.federated.aggregate import ClientUpdate, State
from privtune.federated.client import ClientState, ClientStore, LocalConfig, local_update
from privtune.federated.client_dp import ClientLevelDP
from privtune.federated.config import FederatedConfig
from privtune.federated.fedprox import ProximalTerm
from privtune.federated.protocol import (
    ClientData,
    FederatedClient,
    PartialPromptClient,
    check_client,
    check_data,
    missing_members,
)
from privtune.federated.sampling import RoundPlan, client_seed, plan_round
from privtune.federated.scaffold import DELTA_C, DriftCorrection, Scaffold, client_control_variate
from privtune.prompts.layer_selection import (
    aggregate_layer_scores,
    client_layer_scores,
    hessian_ratio,
    num_layers_from_ratio,
    rank_layers,
    select_layers,
)

Gather = Callable[[Any], list[Any]]


def _single(obj: Any) -> list[Any]:
    return [obj]


class ResumeMismatchError(ValueError):
    """A federated checkpoint from a different run setting (client count, server, layers, seed, sampling)."""


# ---------------------------------------------------------------------------------------------- what is sent
@dataclass
class CommunicatedView:
    """Which part of a client's tensors is communicated.

    Attributes:
        prompt_name: the layered prompt tensor (``[P, L, ...]``, layers on axis 1) of a partial-prompt client, or
            ``None`` when every tensor is communicated whole.
        selected: the communicated layers of that tensor (FedPepTAO's selection; all layers otherwise).
        personal_layers: the unselected layers are trained locally and kept by each client (FedPepTAO's
            personalisation); ``False`` freezes them at their initial values, so the selected layers are the only
            trained part (the same-bytes control without personalisation).
    """

    prompt_name: str | None = None
    selected: list[int] = dataclasses.field(default_factory=list)
    personal_layers: bool = True

    def unselected(self, tensor: Tensor) -> list[int]:
        """The layers of the layered prompt ``tensor`` that are not communicated."""
        chosen = set(self.selected)
        return [i for i in range(tensor.shape[1]) if i not in chosen]

    def of(self, name: str, tensor: Tensor) -> Tensor:
        """The communicated part of ``tensor`` (a copy for the prompt's layer slices, the tensor itself else)."""
        return tensor[:, self.selected] if name == self.prompt_name else tensor

    def write(self, name: str, target: Tensor, value: Tensor) -> None:
        """Write ``value`` (from :meth:`of`) back into ``target`` (a no-op when :meth:`of` returned ``target``)."""
        if name == self.prompt_name:
            target[:, self.selected] = value

    def upload(self, params: Mapping[str, Tensor]) -> State:
        """The communicated tensors of ``params``, detached copies."""
        return {name: self.of(name, p.detach()).clone() for name, p in params.items()}

    @torch.no_grad()
    def load(self, params: Mapping[str, Tensor], personal: Tensor | None, global_state: Mapping[str, Tensor]) -> None:
        """Set ``params`` to the client's personal prompt with the communicated part overwritten by the global one."""
        if self.prompt_name is not None:
            if personal is None:
                raise ValueError(f"a partial-prompt client needs its personal `{self.prompt_name}` tensor.")
            params[self.prompt_name].copy_(personal)
            params[self.prompt_name][:, self.selected] = global_state[self.prompt_name]
        for name, value in global_state.items():
            if name != self.prompt_name:
                params[name].copy_(value)

    def personal(self, params: Mapping[str, Tensor]) -> Tensor | None:
        """What the client keeps between rounds (its full prompt), or ``None``."""
        return None if self.prompt_name is None else params[self.prompt_name].detach().clone()


# ---------------------------------------------------------------------------------------------- one client
@dataclass
class LocalResult:
    """What one client's local round produced.

    Attributes:
        upload: the communicated tensors after training.
        num_steps: ``K_i``, the local optimizer steps taken.
        state: the client's new state (personal prompt, optimizer state, control variate).
        extras: method-specific uploads (SCAFFOLD's ``dc_i``), counted in the traffic.
    """

    upload: State
    num_steps: int
    state: ClientState
    extras: State


def local_round(
    client: FederatedClient,
    view: CommunicatedView,
    global_state: Mapping[str, Tensor],
    state: ClientState,
    batches: Iterable[Any],
    config: LocalConfig,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    control_variate: Mapping[str, Tensor] | None = None,
    eta_l: float | None = None,
    max_steps: int | None = None,
) -> LocalResult:
    """One client's local training for one round (FedPepTAO's device step, spec §6, plus the baselines' terms).

    Args:
        client: the client model (its tensors are overwritten: load, train, read back).
        view: what is communicated.
        global_state: the global communicated tensors received this round.
        state: the client's state from its previous round (:meth:`ClientStore.get`).
        batches: one epoch of the client's batches (re-iterable for ``local_epochs > 1``).
        config: local optimisation settings.
        seed: seeds dropout and any other randomness of the local steps.
        proximal_mu: FedProx's ``mu`` (0: off).
        control_variate: SCAFFOLD's global ``c`` (``None``: no SCAFFOLD); the client's ``c_i`` is in ``state``.
        eta_l: SCAFFOLD's local learning rate in option II (needed with ``control_variate``).
        max_steps: a cap on local steps (stragglers).

    Returns:
        The upload, ``K_i``, the client's new state and the extras.
    """
    params = client.client_parameters()
    names = list(params)
    view.load(params, state.prompt, global_state)
    corrections: list[ProximalTerm | DriftCorrection] = []
    if proximal_mu > 0:
        corrections.append(ProximalTerm(proximal_mu, global_state))
    c_i: State | None = None
    if control_variate is not None:
        c_i = state.control_variate or {k: torch.zeros_like(v) for k, v in global_state.items()}
        corrections.append(DriftCorrection(control_variate, c_i))

    frozen: list[int] = []
    names_index, initial = 0, torch.empty(0)
    if view.prompt_name is not None and not view.personal_layers:
        frozen = view.unselected(params[view.prompt_name])
        names_index = names.index(view.prompt_name)
        initial = params[view.prompt_name].detach()[:, frozen].clone()

    def grad_hook(ps: list[Tensor]) -> None:
        with torch.no_grad():
            if frozen and ps[names_index].grad is not None:
                ps[names_index].grad[:, frozen] = 0.0  # before clipping: frozen layers add nothing to the norm
            if not corrections:
                return
            grads = {n: view.of(n, p.grad) for n, p in zip(names, ps) if p.grad is not None}
            values = {n: view.of(n, p.detach()) for n, p in zip(names, ps) if p.grad is not None}
            for correction in corrections:
                correction.apply(grads, values)
            for n, p in zip(names, ps):
                if n in grads:
                    view.write(n, p.grad, grads[n])

    def restore_frozen(ps: list[Tensor]) -> None:
        with torch.no_grad():
            ps[names_index][:, frozen] = initial  # undo AdamW's decoupled weight decay on the frozen layers

    client.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        steps, optimizer_state = local_update(
            [params[n] for n in names],
            batches,
            client.client_loss,
            config,
            optimizer_state=state.optimizer,
            grad_hook=grad_hook if corrections or frozen else None,
            max_steps=max_steps,
            post_step=restore_frozen if frozen else None,
        )
    upload = view.upload(params)
    extras: State = {}
    new_cv = state.control_variate
    if control_variate is not None and c_i is not None:
        if eta_l is None:
            raise ValueError("SCAFFOLD's option II needs `eta_l`, the local learning rate.")
        new_cv = client_control_variate(c_i, control_variate, global_state, upload, steps, eta_l)
        extras = {DELTA_C + k: new_cv[k] - c_i[k] for k in new_cv}
    new_state = ClientState(
        prompt=view.personal(params),
        optimizer=copy.deepcopy(optimizer_state),
        control_variate=new_cv,
        rounds=state.rounds + 1,
    )
    return LocalResult(upload=upload, num_steps=steps, state=new_state, extras=extras)


def straggler_max_steps(config: FederatedConfig, num_batches: int) -> int:
    """The local steps a straggler completes: ``straggler_steps_fraction`` of its full round (at least 1)."""
    full = num_batches * config.local_epochs
    if config.local_max_steps:
        full = min(full, config.local_max_steps)
    return max(1, math.floor(config.straggler_steps_fraction * full))


# ---------------------------------------------------------------------------------------------- the run
class FederatedLoop:
    """Runs federated rounds over a :class:`FederatedClient` and :class:`ClientData`.

    Args:
        config: the run's :class:`~privtune.federated.config.FederatedConfig` (its server is copied, never mutated).

    Attributes:
        round: rounds completed.
        selected: the communicated prompt layers.
        global_state: the global communicated tensors.
        server: this run's server optimizer (a bound copy of ``config.server``).
        store: every client's state.
        ledger: bytes and time per round.
        history: the metrics of every round.
        pending: the finished clients of an interrupted round (resumed, not retrained).
        on_client_end: called with ``(round, client)`` after each client this process trains.
    """

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.round = 0
        self.selected: list[int] = []
        self.layer_scores: list[float] = []
        self.ratio: float | None = None
        self.global_state: State = {}
        self.server: Any = None
        self.local: LocalConfig | None = None
        self.store: ClientStore | None = None
        self.view = CommunicatedView()
        self.ledger = CommLedger()
        self.history: list[dict[str, Any]] = []
        self.pending: dict[str, Any] | None = None
        self.num_clients = 0
        self.client: FederatedClient | None = None
        self.data: ClientData | None = None
        self.client_dp: ClientLevelDP | None = None  # this run's copy of `config.client_dp`, planned at set-up
        self.stop_reason: str | None = None
        self._restored: dict[str, Any] | None = None
        self.on_client_end: Callable[[int, int], None] | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, client: FederatedClient, data: ClientData) -> None:
        """Check the client and the data, choose the layers, bind the server, build the store (before training).

        A state kept by :meth:`restore_later` is loaded here instead of choosing layers again.

        Raises:
            TypeError: if the client lacks a member of its Protocol.
            ValueError: if the data is not client-partitioned, the layer choice does not fit the model, or the
                kept state comes from another run setting.
        """
        cfg = self.config
        check_data(data)
        check_client(client, partial=cfg.layers != "all")
        self.client, self.data = client, data
        self.num_clients = int(data.num_clients)
        partial = not missing_members(client, PartialPromptClient)
        if partial:
            num_layers = int(client.num_prompt_layers)
            if cfg.layers == "list":
                bad = [i for i in cfg.selected_layers or [] if not 0 <= i < num_layers]
                if bad:
                    raise ValueError(
                        f"`selected_layers` has {bad} outside the model's {num_layers} prompt layers "
                        f"(0..{num_layers - 1})."
                    )
            if cfg.num_selected_layers is not None and cfg.num_selected_layers > num_layers:
                raise ValueError(
                    f"`num_selected_layers={cfg.num_selected_layers}` exceeds the model's {num_layers} prompt layers."
                )
        params = client.client_parameters()
        prompt_name = client.prompt_name if partial else None
        self.server = copy.deepcopy(cfg.server)
        self.server.bind(
            num_clients=self.num_clients,
            prompt_names=[prompt_name] if prompt_name is not None else list(params),
            client_lr=cfg.resolved_client_lr(self.server),
        )
        self.local = cfg.local_config(self.server)
        self.client_dp = self._plan_client_dp()
        if self._restored is not None:
            restored, self._restored = self._restored, None
            self.view = CommunicatedView(prompt_name, list(restored["selected"]), cfg.personal_layers)
            self.load_state_dict(restored)
            return
        self.selected = self._choose_layers(client, data) if partial else []
        self.view = CommunicatedView(prompt_name, list(self.selected), cfg.personal_layers)
        self.store = ClientStore(initial_prompt=self.view.personal(params))
        self.global_state = self.view.upload(params)

    def setup_server(
        self,
        num_clients: int,
        global_state: Mapping[str, Tensor],
        *,
        prompt_name: str | None = None,
        selected: Sequence[int] = (),
    ) -> None:
        """Server-side set-up without a client model or data (a Flower ``ServerApp``): bind the server optimizer,
        plan client-level DP, hold the initial global state. Then :meth:`plan` and :meth:`aggregate` run the server's
        part of each round; the clients run :func:`local_round` (with :func:`straggler_max_steps` for stragglers).

        Args:
            num_clients: ``N``.
            global_state: the initial communicated tensors (what :meth:`CommunicatedView.upload` gives on a client).
            prompt_name: the layered prompt tensor of a partial-prompt client, if any.
            selected: its communicated layers.
        """
        cfg = self.config
        self.num_clients = int(num_clients)
        names = [prompt_name] if prompt_name is not None else list(global_state)
        self.server = copy.deepcopy(cfg.server)
        lr = cfg.resolved_client_lr(self.server)
        self.server.bind(num_clients=self.num_clients, prompt_names=names, client_lr=lr)
        self.local = cfg.local_config(self.server)
        self.client_dp = self._plan_client_dp()
        self.selected = list(selected)
        self.view = CommunicatedView(prompt_name, list(selected), cfg.personal_layers)
        self.global_state = {k: v.detach().clone() for k, v in global_state.items()}
        if self._restored is not None:
            restored, self._restored = self._restored, None
            self.load_state_dict(restored)

    def server_control_variate(self) -> State | None:
        """SCAFFOLD's global ``c`` to send to this round's clients (``None`` for other servers)."""
        return self.server.control_variate(self.global_state) if isinstance(self.server, Scaffold) else None

    def _plan_client_dp(self) -> ClientLevelDP | None:
        """This run's copy of ``config.client_dp``, planned for the run's rounds, cohort and client count."""
        cfg = self.config
        if cfg.client_dp is None:
            return None
        dp = copy.deepcopy(cfg.client_dp)
        cohort = len(plan_round(1, self.num_clients, cfg.sample_fraction, cfg.seed).sampled)
        dp.plan(num_rounds=cfg.num_rounds, sample_rate=cohort / self.num_clients, clients_per_round=cohort)
        return dp

    def _dp_generator(self, round_idx: int) -> torch.Generator:
        """The round's noise generator, derived from ``(seed, round)`` so every DDP rank and a resumed run draw the
        same noise (simulation; a deployment's server keeps its noise seed secret)."""
        seed = int(np.random.default_rng([self.config.seed, round_idx, 104729]).integers(0, 2**62))
        return torch.Generator().manual_seed(seed)

    def _choose_layers(self, client: PartialPromptClient, data: ClientData) -> list[int]:
        cfg = self.config
        num_layers = int(client.num_prompt_layers)
        if cfg.layers == "all":
            return list(range(num_layers))
        if cfg.layers == "list":
            return list(cfg.selected_layers or [])
        # FedPepTAO: score every client's first mini-batch of `scoring_batch_size` examples, weighted by n_k
        client.train()
        scores, sizes = [], []
        for cid in range(self.num_clients):
            batch = _first_batch(data.client_train_loader(cid, cfg.seed), cfg.scoring_batch_size)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(client_seed(cfg.seed, 0, cid))
                scores.append(client_layer_scores(client.hidden_states(batch)))
            sizes.append(data.client_num_examples(cid))
        total = aggregate_layer_scores(scores, sizes)
        self.layer_scores = [float(s) for s in total]
        ranking = rank_layers(total)
        if cfg.num_selected_layers is not None:
            k = cfg.num_selected_layers
        elif cfg.selection_ratio is not None:
            self.ratio = cfg.selection_ratio
            k = num_layers_from_ratio(cfg.selection_ratio, num_layers)
        else:
            self.ratio = self._slq_ratio(client, data)
            k = num_layers_from_ratio(self.ratio, num_layers)
        return select_layers(ranking, k)

    def _slq_ratio(self, client: PartialPromptClient, data: ClientData) -> float:
        """Mean SLQ ratio over round-1 sampled clients (the code warms up 10 FedAvg rounds first; see docs)."""
        cfg = self.config
        plan = plan_round(1, self.num_clients, cfg.sample_fraction, cfg.seed)
        param = client.client_parameters()[client.prompt_name]
        ratios = []
        for cid in plan.sampled:
            batch = _first_batch(data.client_train_loader(cid, cfg.seed), cfg.scoring_batch_size)

            def loss(batch: Any = batch, cid: int = cid) -> Tensor:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cid)
                    return client.client_loss(batch)

            ratios.append(hessian_ratio(loss, param, num_iters=cfg.slq_iterations, seed=cid))
        return float(sum(ratios) / len(ratios))

    def elements_per_client(self) -> int:
        """Elements of the communicated state (per client, per direction)."""
        return sum(t.numel() for t in self.global_state.values())

    # ------------------------------------------------------------------ one round
    def plan(self, round_idx: int) -> RoundPlan:
        """The sampled, dropped and straggling clients of round ``round_idx`` (1-based)."""
        cfg = self.config
        return plan_round(
            round_idx, self.num_clients, cfg.sample_fraction, cfg.seed, cfg.dropout_fraction, cfg.straggler_fraction
        )

    def train_client(self, client_id: int, plan: RoundPlan) -> tuple[ClientUpdate, ClientState]:
        """Local training of one client this round (in this process); returns its upload and its new state."""
        cfg = self.config
        client, data, store, local = self._ready()
        start = time.perf_counter()
        seed = client_seed(cfg.seed, self.round + 1, client_id)
        loader = data.client_train_loader(client_id, seed)
        max_steps = straggler_max_steps(cfg, len(loader)) if client_id in plan.stragglers else None  # type: ignore[arg-type]
        scaffold = isinstance(self.server, Scaffold)
        result = local_round(
            client,
            self.view,
            self.global_state,
            store.get(client_id),
            loader,
            local,
            seed=seed,
            proximal_mu=cfg.proximal_mu,
            control_variate=self.server_control_variate(),
            eta_l=self.server.eta_l if scaffold else None,
            max_steps=max_steps,
        )
        update = ClientUpdate(
            client_id=client_id,
            state=result.upload,
            num_examples=data.client_num_examples(client_id),
            num_steps=result.num_steps,
            seconds=time.perf_counter() - start,
            extras=result.extras,
        )
        return update, result.state

    def aggregate(self, round_idx: int, plan: RoundPlan, updates: list[ClientUpdate]) -> dict[str, float]:
        """The server's part of round ``round_idx``: client-level DP, server step and accounting; the round counts
        as done. Returns the round's metrics.

        Args:
            round_idx: the 1-based round.
            plan: the round's plan.
            updates: the reporting clients' uploads, in sampling order.
        """
        dp_metrics: dict[str, float] = {}
        if self.client_dp is not None:
            # clip each update w_i - w, noise the uniform mean; the server optimizer gets that mean as every
            # client's upload with equal weights (post-processing; step counts K_i stay metadata, as in Flower)
            private = self.client_dp.private_mean(
                self.global_state, [u.state for u in updates], self._dp_generator(round_idx)
            )
            updates = [dataclasses.replace(u, state=private, num_examples=1, extras={}) for u in updates]
            dp_metrics = {
                "privacy/epsilon": self.client_dp.epsilon(),
                "privacy/clipping_norm": self.client_dp.clipping_norm,
                "privacy/noise_std": self.client_dp.noise_std(),
            }
        self.global_state = self.server.step(self.global_state, updates)
        rec = self.ledger.record(
            round_idx,
            plan.sampled,
            plan.reporting,
            self.elements_per_client(),
            {u.client_id: u.seconds for u in updates},
            factor=self.server.bytes_factor,
        )
        metrics: dict[str, float] = {
            "round": float(round_idx),
            "comm/up_bytes": float(rec.up_bytes),
            "comm/down_bytes": float(rec.down_bytes),
            "comm/cum_up_bytes": float(self.ledger.total_up_bytes),
            "comm/cum_down_bytes": float(self.ledger.total_down_bytes),
            "comm/num_transfer_params": float(rec.num_transfer_params),
            "time/round_seconds": rec.round_seconds,
            "time/serial_seconds": rec.serial_seconds,
            "clients/reported": float(len(plan.reporting)),
            "clients/mean_local_steps": sum(u.num_steps for u in updates) / max(len(updates), 1),
        }
        metrics.update(getattr(self.server, "diagnostics", {}))
        metrics.update(dp_metrics)
        self.round = round_idx
        return metrics

    def run_round(self, rank: int = 0, world_size: int = 1, gather: Gather = _single) -> dict[str, float]:
        """Run the next round; returns the metrics to log (empty once every round is done).

        Args:
            rank: this process's index among ``world_size`` (DDP); it trains the reporting clients
                ``j % world_size == rank``.
            world_size: processes sharing the round.
            gather: collects one object from every process, in rank order (identity for one process).
        """
        cfg = self.config
        _, _, store, _ = self._ready()
        if self.round >= cfg.num_rounds or self.stop_reason is not None:
            return {}
        r = self.round + 1
        if self.client_dp is not None and not self.client_dp.round_allowed(r):
            self.stop_reason = (
                f"client-level DP: round {r} would spend epsilon={self.client_dp.epsilon(r):.4g} > "
                f"target_epsilon={self.client_dp.target_epsilon}; stopped after round {self.round} at "
                f"epsilon={self.client_dp.epsilon():.4g}."
            )
            return {}
        plan = self.plan(r)
        if self.pending is None or self.pending["round"] != r:
            self.pending = {"round": r, "updates": {}, "states": {}}
        mine = [c for j, c in enumerate(plan.reporting) if j % world_size == rank]
        for cid in mine:
            if cid in self.pending["updates"]:
                continue  # trained before an interruption; its result is in the checkpoint
            update, new_state = self.train_client(cid, plan)
            self.pending["updates"][cid] = update
            self.pending["states"][cid] = new_state
            if self.on_client_end is not None:
                self.on_client_end(r, cid)
        mine_results = {c: (self.pending["updates"][c], self.pending["states"][c]) for c in mine}
        merged: dict[int, tuple[ClientUpdate, ClientState]] = {}
        for part in gather(mine_results):
            merged.update(part)
        metrics = self.aggregate(r, plan, [merged[c][0] for c in plan.reporting])
        for c in plan.reporting:
            store.put(c, merged[c][1])
        self.round = r
        self.pending = None
        if r % cfg.eval_every == 0 or r == cfg.num_rounds:
            metrics["fed/personalized_acc"] = self.evaluate(rank, world_size, gather)
            metrics["fed/global_acc"] = (
                self.evaluate(rank, world_size, gather, personalised=False)
                if self.view.prompt_name is not None
                else metrics["fed/personalized_acc"]  # nothing personal: the global model is every client's model
            )
        self.history.append(dict(metrics))
        return metrics

    @torch.no_grad()
    def evaluate(
        self, rank: int = 0, world_size: int = 1, gather: Gather = _single, *, personalised: bool = True
    ) -> float:
        """Accuracy pooled over every client's evaluation split (together: the whole evaluation split).

        Personalised: each client's own prompt with the global part. Global (``personalised=False``): the initial
        prompt with the global part on every client, i.e. the global model alone, what a new client receives.
        """
        client, data, store, _ = self._ready()
        client.eval()
        correct = total = 0
        for cid in range(rank, self.num_clients, world_size):
            loader = data.client_eval_loader(cid)
            if _num_items(loader) == 0:
                continue
            own = store.get(cid).prompt if personalised else store.initial_prompt
            self.view.load(client.client_parameters(), own, self.global_state)
            for batch in loader:
                c, t = client.evaluate_batch(batch)
                correct += int(c)
                total += int(t)
        client.train()
        parts = gather((correct, total))
        c, t = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return c / max(t, 1)

    def _ready(self) -> tuple[FederatedClient, ClientData, ClientStore, LocalConfig]:
        if self.client is None or self.data is None or self.store is None or self.local is None:
            raise RuntimeError("call `FederatedLoop.setup(client, data)` before running rounds.")
        return self.client, self.data, self.store, self.local

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpointed one (compared by :meth:`load_state_dict`)."""
        cfg = self.config
        server = type(self.server)
        return {
            "num_clients": self.num_clients,
            "server": f"{server.__module__}.{server.__qualname__}",
            "server_args": _plain(self.server.describe()),
            "layers": cfg.layers,
            "selected_layers": cfg.selected_layers,
            "num_selected_layers": cfg.num_selected_layers,
            "selection_ratio": cfg.selection_ratio,
            "seed": cfg.seed,
            "sample_fraction": cfg.sample_fraction,
            "proximal_mu": cfg.proximal_mu,
            "personal_layers": cfg.personal_layers,
            "client_dp": _dp_settings(cfg.client_dp),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, mid-round included; plain tensors and containers only."""
        return {
            "fingerprint": self.fingerprint(),
            "round": self.round,
            "selected": list(self.selected),
            "layer_scores": list(self.layer_scores),
            "ratio": self.ratio,
            "global_state": self.global_state,
            "server": self.server.state_dict() if self.server is not None else None,
            "store": self.store.state_dict() if self.store is not None else None,
            "ledger": self.ledger.state_dict(),
            "history": self.history,
            "pending": _pending_to_plain(self.pending),
            "client_dp": self.client_dp.state_dict() if self.client_dp is not None else None,
        }

    def check_resume(self, state: Mapping[str, Any]) -> None:
        """Refuse a state from another run setting, naming each differing value in the checkpoint and in this run.

        Raises:
            ResumeMismatchError: on any difference of :meth:`fingerprint`.
        """
        saved = state.get("fingerprint")
        if saved is None:
            raise ResumeMismatchError(
                "The federated checkpoint has no run fingerprint (client count, server, layers, seed), so it cannot "
                "be checked against this run; start a new run."
            )
        saved = {"personal_layers": True, **saved}  # checkpoints from before the option had personal layers
        now = self.fingerprint()
        diffs = [f"`{k}`: checkpoint {saved.get(k)!r}, this run {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if diffs:
            raise ResumeMismatchError(
                "The federated checkpoint was written by a run with different settings; resuming would mix two "
                "runs. Differences: " + "; ".join(diffs) + ". Resume with the checkpoint's settings or start a new run."
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`, after :meth:`check_resume` (needs :meth:`setup`'s server to exist).

        Raises:
            ResumeMismatchError: if the state comes from another run setting.
        """
        self.check_resume(state)
        self.store = None if state["store"] is None else ClientStore(initial_prompt=state["store"]["initial_prompt"])
        self.round = int(state["round"])
        self.selected = list(state["selected"])
        self.layer_scores = list(state["layer_scores"])
        self.ratio = state["ratio"]
        self.global_state = dict(state["global_state"])
        self.server.load_state_dict(state["server"])
        if self.store is not None:
            self.store.load_state_dict(state["store"])
        self.ledger.load_state_dict(state["ledger"])
        self.history = list(state["history"])
        self.pending = _pending_from_plain(state["pending"])
        if self.client_dp is not None and state.get("client_dp") is not None:
            self.client_dp.load_state_dict(state["client_dp"])

    def restore_later(self, state: dict[str, Any]) -> None:
        """Keep a checkpointed state to load at :meth:`setup` (Lightning loads checkpoints before set-up ends)."""
        self._restored = state

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        """The run's report (plain data): configuration, server, selection, traffic, history."""
        cfg = self.config
        shapes = {k: list(v.shape) for k, v in self.global_state.items()}
        return {
            "server": type(self.server).__name__ if self.server is not None else None,
            "config": {k: _plain(v) for k, v in vars(cfg).items() if k not in ("server", "client_dp")},
            "server_optimizer": _plain(self.server.describe()) if self.server is not None else {},
            "local": _plain(dataclasses.asdict(self.local)) if self.local is not None else {},
            "selected_layers": self.selected,
            "layer_scores": self.layer_scores,
            "selection_ratio": self.ratio,
            "communicated_shapes": shapes,
            "elements_per_client": self.elements_per_client(),
            "ledger": self.ledger.summary(),
            "history": self.history,
            "peak_client_state_bytes": self.store.nbytes() if self.store is not None else 0,
            "client_dp": self.client_dp.describe() if self.client_dp is not None else None,
            "stop_reason": self.stop_reason,
        }


def _dp_settings(dp: ClientLevelDP | None) -> dict[str, Any] | None:
    """The configured privacy settings of ``client_dp`` (before planning), for the resume fingerprint."""
    if dp is None:
        return None
    keys = ("clipping_norm", "noise_multiplier", "target_epsilon", "delta", "adaptive")
    return {k: getattr(dp, k) for k in keys}


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and anything not plain data as its ``repr`` (for fingerprints and reports)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return repr(value)


def _num_items(loader: Any) -> int:
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None else len(loader)


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


def _first_batch(loader: Any, size: int) -> Any:
    """The first ``size`` examples of a client's loader, collated together (a ``DataLoader``'s dataset and
    ``collate_fn``)."""
    items = [loader.dataset[i] for i in range(min(size, len(loader.dataset)))]
    return loader.collate_fn(items)
