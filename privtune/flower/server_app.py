"""privtune's federated server as a Flower 1.42 ``ServerApp`` (Message API) driving the core round loop.

The ServerApp holds a :class:`privtune.federated.loop.FederatedLoop` and uses its server half: the round plan
(sampling, dropout, stragglers seeded by ``(seed, round)``), the server optimizer (FedPepTAO's, FedAvg, FedAvgM,
FedAdam, FedYogi, FedAdagrad, SCAFFOLD; injected by class path), client-level DP when configured, and the traffic
ledger. The clients' half runs on the SuperNodes (:mod:`privtune.flower.client_app`). One run:

1. wait for the ``num_clients`` SuperNodes, ``query`` each for its ``partition-id``, example count, initial tensors
   (all must be equal: same config and seed) and, for FedPepTAO, its layer scores; choose the layers as the loop
   does (spec §5: scores weighted by ``n_k``, top ``k``);
2. per round: ``train`` messages with the global communicated tensors to the reporting clients of the loop's plan,
   the uploads go through the loop's ``aggregate`` (server step, DP, ledger);
3. ``evaluate`` messages to every client every ``eval_every`` rounds (personalised accuracy, pooled counts);
4. write ``global_prompt.pt`` (the final global tensors) and ``report.json`` to the run config's ``output-dir``.

The global tensors after each round equal the in-process simulation's with the same config and seed
(``tests/test_flower_app.py``); the ledger counts the same bytes (float32 payload); the bytes of Flower's records on
the wire (names and array headers included) are reported beside them.

Threat model: the server sees the sampled clients' communicated slices (and SCAFFOLD's ``dc_i``), their example
counts and layer scores; never their text or personal layers. With client-level DP the released global tensors
are ``(epsilon, delta)``-DP at the client level.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from privtune.federated.aggregate import ClientUpdate
from privtune.federated.config import FederatedConfig
from privtune.federated.loop import CommunicatedView, FederatedLoop
from privtune.federated.scaffold import Scaffold
from privtune.flower.records import from_record, local_config_to_record, to_record
from privtune.flower.run import config_path, federated_config, num_clients, read_config
from privtune.prompts.layer_selection import (
    aggregate_layer_scores,
    num_layers_from_ratio,
    rank_layers,
    select_layers,
)

OUTPUT_KEY = "output-dir"
WAIT_KEY = "node-wait-seconds"
NOISE_KEY = "reproducible-noise"


class FlowerRunError(RuntimeError):
    """A SuperNode failed, is missing, or disagrees with the others."""


def _send(grid: Grid, messages: list[Message], what: str) -> list[Message]:
    replies = list(grid.send_and_receive(messages))
    failed = [r for r in replies if r.has_error()]
    if failed:
        first = failed[0]
        raise FlowerRunError(
            f"privtune ServerApp: {len(failed)} of {len(messages)} SuperNodes failed the {what} message; node "
            f"{first.metadata.src_node_id}: {first.error.reason}"
        )
    if len(replies) != len(messages):
        raise FlowerRunError(
            f"privtune ServerApp: {len(replies)} of {len(messages)} SuperNodes replied to the {what} message."
        )
    return replies


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The ids of at least ``count`` connected SuperNodes, waiting up to ``timeout`` seconds.

    Raises:
        FlowerRunError: if fewer are connected by then.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise FlowerRunError(
                f"privtune ServerApp: {len(nodes)} SuperNodes connected after {timeout:.0f} s, the config has "
                f"num_clients={count}; start one SuperNode per client (partition-id 0..{count - 1}) or raise the "
                f"run config `{WAIT_KEY}`."
            )
        time.sleep(0.5)


def _record_bytes(records: Iterable[ArrayRecord]) -> int:
    return sum(r.count_bytes() for r in records)


class _FlowerLoop(FederatedLoop):
    """The round loop with a secret client-level DP noise seed unless reproducible noise is asked for.

    The in-process loop derives the noise from ``(seed, round)`` so simulations and DDP ranks agree; the seed is in
    the config, so on real SuperNodes that noise would be public. Here it comes from ``secrets`` unless
    ``reproducible_noise`` is set (tests comparing with the simulation).
    """

    def __init__(self, config: FederatedConfig, reproducible_noise: bool) -> None:
        super().__init__(config)
        self.reproducible_noise = reproducible_noise

    def _dp_generator(self, round_idx: int) -> torch.Generator:
        if self.reproducible_noise:
            return super()._dp_generator(round_idx)
        return torch.Generator().manual_seed(secrets.randbits(63))


class FlowerServer:
    """The server half of a privtune run over a Flower ``Grid``.

    Args:
        config: the run's federated configuration.
        num_clients: ``N`` (one SuperNode each).
        node_wait_seconds: how long to wait for the SuperNodes.
        reproducible_noise: draw client-level DP noise from ``(seed, round)`` as the in-process simulation does
            (for comparisons only: anyone with the config can then remove the noise); default a secret seed.
    """

    def __init__(
        self,
        config: FederatedConfig,
        num_clients: int,
        node_wait_seconds: float = 120.0,
        reproducible_noise: bool = False,
    ) -> None:
        if config.layers == "fedpeptao" and config.num_selected_layers is None and config.selection_ratio is None:
            raise ValueError(
                "privtune Flower app: `selection_ratio: null` (the SLQ estimate of the prompt Hessian) is not "
                "supported across SuperNodes; set `selection_ratio` or `num_selected_layers`."
            )
        self.config = config
        self.loop = _FlowerLoop(config, reproducible_noise)
        self.num_clients = num_clients
        self.node_wait_seconds = node_wait_seconds
        self.node_of: dict[int, int] = {}  # client id -> SuperNode id
        self.wire_bytes: list[dict[str, int]] = []
        self.timing: dict[str, float] = {}  # wall clock of the ServerApp: start (unix time), set-up seconds

    # ------------------------------------------------------------------ set-up
    def _config_record(self, **extra: Any) -> ConfigRecord:
        return ConfigRecord({"partial": self.config.layers != "all", **extra})

    def setup(self, grid: Grid) -> None:
        """Find the clients, check they agree, choose the layers; :meth:`FederatedLoop.setup_server` does the rest."""
        cfg, loop = self.config, self.loop
        nodes = wait_for_nodes(grid, self.num_clients, self.node_wait_seconds)
        query = self._config_record(
            **{
                "score-layers": cfg.layers == "fedpeptao",
                "seed": cfg.seed,
                "scoring-batch-size": cfg.scoring_batch_size,
            }
        )
        messages = [
            Message(RecordDict({"config": query}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
        ]
        replies = _send(grid, messages, "query")
        info: dict[int, Message] = {}
        for reply in replies:
            cid = int(reply.content["metrics"]["partition-id"])  # type: ignore[arg-type]
            if cid in info:
                raise FlowerRunError(
                    f"privtune ServerApp: two SuperNodes serve partition-id={cid} (nodes "
                    f"{info[cid].metadata.src_node_id} and {reply.metadata.src_node_id}); give each its own."
                )
            info[cid] = reply
            self.node_of[cid] = reply.metadata.src_node_id
        missing = [c for c in range(self.num_clients) if c not in info]
        if missing:
            raise FlowerRunError(f"privtune ServerApp: no SuperNode serves partition-id {missing}.")
        first = info[0].content
        initial = from_record(first["initial"])
        for cid in range(1, self.num_clients):
            other = from_record(info[cid].content["initial"])
            if set(other) != set(initial) or any(not torch.equal(other[k], initial[k]) for k in initial):
                raise FlowerRunError(
                    f"privtune ServerApp: partition {cid} built different initial tensors from partition 0; every "
                    "SuperNode must use the same config (model, seed_everything)."
                )
        prompt_name = str(first["info"]["prompt-name"]) or None
        num_layers = int(first["metrics"]["num-prompt-layers"])  # type: ignore[arg-type]
        selected = self.choose_layers(info, prompt_name, num_layers)
        # everything else (server optimizer, local settings, client-level DP, communicated view) as in the loop
        view = CommunicatedView(prompt_name, selected, cfg.personal_layers)
        loop.setup_server(self.num_clients, view.upload(initial), prompt_name=prompt_name, selected=selected)
        self.examples = {c: int(info[c].content["metrics"]["num-examples"]) for c in range(self.num_clients)}  # type: ignore[arg-type]

    def choose_layers(self, info: dict[int, Message], prompt_name: str | None, num_layers: int) -> list[int]:
        """The communicated prompt layers, from the clients' ``query`` replies (the Flower-specific part of set-up).

        As :meth:`FederatedLoop._choose_layers` in one process: every layer, the configured list, or FedPepTAO's
        choice (spec §5: the clients' layer scores weighted by their example counts, top ``k``). The server sees
        only the scores and counts, never the clients' text. Sets the loop's ``layer_scores`` and ``ratio``.
        """
        cfg, loop = self.config, self.loop
        if prompt_name is None:
            return []
        if cfg.layers == "all":
            return list(range(num_layers))
        if cfg.layers == "list":
            return list(cfg.selected_layers or [])
        scores = [list(info[c].content["metrics"]["layer-scores"]) for c in range(self.num_clients)]  # type: ignore[arg-type]
        sizes = [int(info[c].content["metrics"]["num-examples"]) for c in range(self.num_clients)]  # type: ignore[arg-type]
        total = aggregate_layer_scores([torch.tensor(s) for s in scores], sizes)
        loop.layer_scores = [float(s) for s in total]
        if cfg.num_selected_layers is not None:
            k = cfg.num_selected_layers
        else:
            loop.ratio = cfg.selection_ratio
            k = num_layers_from_ratio(float(cfg.selection_ratio), num_layers)  # type: ignore[arg-type]
        return select_layers(rank_layers(total), k)

    # ------------------------------------------------------------------ rounds
    def _round_config(self, round_idx: int) -> ConfigRecord:
        loop = self.loop
        return self._config_record(
            **{
                "round": round_idx,
                "seed": self.config.seed,
                "prompt-name": loop.view.prompt_name or "",
                "selected": [int(i) for i in loop.view.selected],
                "personal-layers": bool(loop.view.personal_layers),
                "proximal-mu": float(self.config.proximal_mu),
            }
        )

    def run_round(self, grid: Grid) -> dict[str, float]:
        """One round over the SuperNodes; returns the loop's metrics plus Flower's record bytes."""
        cfg, loop = self.config, self.loop
        start = time.perf_counter()
        r = loop.round + 1
        plan = loop.plan(r)
        scaffold = isinstance(loop.server, Scaffold)
        arrays = to_record(loop.global_state)
        local = local_config_to_record(loop.local)  # type: ignore[arg-type]
        messages, down = [], []
        for cid in plan.reporting:
            config = self._round_config(r)
            config["straggler-steps-fraction"] = float(cfg.straggler_steps_fraction) if cid in plan.stragglers else 0.0
            content = RecordDict({"arrays": arrays, "config": config, "local": local})
            if scaffold:
                content["control"] = to_record(loop.server.control_variate(loop.global_state))
                config["eta-l"] = float(loop.server.eta_l)
            down.extend(content.array_records.values())
            messages.append(Message(content, dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN))
        replies = _send(grid, messages, f"round {r} train") if messages else []
        by_client = {self._client_of(reply): reply for reply in replies}
        updates = []
        for cid in plan.reporting:
            content = by_client[cid].content
            metrics = content["metrics"]
            extras = from_record(content["extras"]) if "extras" in content.array_records else {}
            updates.append(
                ClientUpdate(
                    client_id=cid,
                    state=from_record(content["arrays"]),
                    num_examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
                    num_steps=int(metrics["num-steps"]),  # type: ignore[arg-type]
                    seconds=float(metrics["seconds"]),  # type: ignore[arg-type]
                    extras=extras,
                )
            )
        up = _record_bytes(rec for reply in replies for rec in reply.content.array_records.values())
        metrics = loop.aggregate(r, plan, updates)
        for key in ("process-seconds", "build-seconds"):  # the slowest node's ClientApp start-up and model build
            values = [float(reply.content["metrics"][key]) for reply in replies if key in reply.content["metrics"]]
            if values:
                metrics[f"flower/client_{key.replace('-', '_')}_max"] = max(values)
        loop.round = r
        metrics["flower/up_record_bytes"] = float(up)
        metrics["flower/down_record_bytes"] = float(_record_bytes(down))
        if r % cfg.eval_every == 0 or r == cfg.num_rounds:
            metrics["fed/personalized_acc"] = self.evaluate(grid)
            metrics["fed/global_acc"] = (
                self.evaluate(grid, personalised=False)
                if loop.view.prompt_name is not None
                else metrics["fed/personalized_acc"]
            )
        metrics["flower/round_wall_seconds"] = time.perf_counter() - start  # messages, client processes, server step
        loop.history.append(dict(metrics))
        return metrics

    def _client_of(self, reply: Message) -> int:
        node = reply.metadata.src_node_id
        return next(c for c, n in self.node_of.items() if n == node)

    def evaluate(self, grid: Grid, personalised: bool = True) -> float:
        """Accuracy over every client (pooled correct / total): each client's own prompt with the global part, or
        (``personalised=False``) the initial prompt with the global part (the global model alone)."""
        loop = self.loop
        arrays = to_record(loop.global_state)
        config = self._round_config(loop.round)
        config["personalised"] = bool(personalised)
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=self.node_of[c],
                message_type=MessageType.EVALUATE,
            )
            for c in range(self.num_clients)
        ]
        replies = _send(grid, messages, "evaluate")
        correct = sum(int(r.content["metrics"]["correct"]) for r in replies)  # type: ignore[arg-type]
        total = sum(int(r.content["metrics"]["total"]) for r in replies)  # type: ignore[arg-type]
        return correct / max(total, 1)

    def run(self, grid: Grid) -> dict[str, Any]:
        """Set up and run every round (stopping before one client-level DP does not allow); returns the report."""
        self.timing["started_unix"] = time.time()
        start = time.perf_counter()
        self.setup(grid)
        self.timing["setup_seconds"] = time.perf_counter() - start
        loop = self.loop
        while loop.round < self.config.num_rounds:
            r = loop.round + 1
            dp = loop.client_dp
            if dp is not None and not dp.round_allowed(r):
                loop.stop_reason = (
                    f"client-level DP: round {r} would spend epsilon={dp.epsilon(r):.4g} > "
                    f"target_epsilon={dp.target_epsilon}; stopped after round {loop.round} at "
                    f"epsilon={dp.epsilon():.4g}."
                )
                break
            self.run_round(grid)
        return loop.report()

    def save(self, out: str | Path) -> None:
        """Write ``global_prompt.pt`` (the final global tensors) and ``report.json``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.loop.global_state.items()}, out / "global_prompt.pt")
        report = {"driver": "flower", **self.loop.report(), "flower_timing": self.timing}
        (out / "report.json").write_text(json.dumps(report, indent=2, default=repr))


def make_server_app(
    config: str | Path | None = None, output_dir: str | Path | None = None, reproducible_noise: bool = False
) -> ServerApp:
    """A ``ServerApp`` for the privtune config at ``config`` (``None``: the run config's ``config`` entry).

    Results go to ``output_dir``, else the run config's ``output-dir``, else nowhere. ``reproducible_noise`` (or
    the run config's ``reproducible-noise = true``) draws client-level DP noise as the simulation does (tests only).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        raw = read_config(config_path(config, context.run_config))
        wait = float(context.run_config.get(WAIT_KEY, 120.0))  # type: ignore[arg-type]
        reproducible = reproducible_noise or bool(context.run_config.get(NOISE_KEY, False))
        server = FlowerServer(
            federated_config(raw), num_clients(raw), node_wait_seconds=wait, reproducible_noise=reproducible
        )
        server.run(grid)
        out = output_dir if output_dir is not None else context.run_config.get(OUTPUT_KEY)
        if out:
            server.save(str(out))

    return app


app = make_server_app()  # `serverapp = "privtune.flower.server_app:app"`: the config comes from the run config
