"""privtune's federated client as a Flower 1.42 ``ClientApp`` (Message API): one SuperNode = one client.

The client runs privtune's own local round (:func:`privtune.federated.loop.local_round`): its personal prompt with
the communicated part overwritten by the global one, local steps of its optimizer, FedProx's term and SCAFFOLD's
drift correction when the server asks for them (FedPepTAO, Che et al., EMNLP 2023, arXiv 2310.15080, spec §6). Its
state between rounds (the full personal prompt, the optimizer's moments, SCAFFOLD's ``c_i``) stays on the node in
``context.state``. Three message types:

* ``query`` (once, before round 1): the node's ``partition-id``, its example count, its initial tensors and, for
  FedPepTAO's layer selection, its layer scores on its first ``scoring_batch_size`` examples (spec §5);
* ``train``: the global communicated tensors in, the client's communicated tensors (and SCAFFOLD's ``dc_i``) out;
* ``evaluate``: personalised accuracy of the client's own prompt with the global part (correct and total counts).

The node's ``partition-id`` (``--node-config "partition-id=0 num-partitions=N"``; set by the simulation engine
automatically) picks the client's shard of the configured ``FederatedDataModule``.

Threat model: only the selected layers' prompt slices (and, for SCAFFOLD, ``dc_i``), one list of layer scores and
the example count leave the node; its text, its personal layers and its optimizer state do not.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privtune.federated.client import ClientState
from privtune.federated.loop import CommunicatedView, local_round
from privtune.federated.protocol import PartialPromptClient, missing_members
from privtune.federated.sampling import client_seed
from privtune.flower.records import (
    client_state_from_bytes,
    client_state_to_bytes,
    from_record,
    local_config_from_record,
    to_record,
)
from privtune.flower.run import ClientSide, build_client_side, config_path, read_config
from privtune.prompts.layer_selection import client_layer_scores

STATE_KEY = "privtune"
_SIDES: dict[tuple[str, bool], ClientSide] = {}  # one model and data per config and process
_BUILD_SECONDS: dict[tuple[str, bool], float] = {}  # what building each cost this process (reported once)


def _side(path: Path, partial: bool) -> ClientSide:
    key = (str(path.resolve()), partial)
    if key not in _SIDES:
        start = time.perf_counter()
        _SIDES[key] = build_client_side(read_config(path), partial)
        _BUILD_SECONDS[key] = time.perf_counter() - start
    return _SIDES[key]


def _startup_metrics() -> dict[str, float]:
    """This ClientApp process's own cost before and around the message: ``process-seconds`` (since the process
    started, at the reply) and ``build-seconds`` (building the model and data in this process; 0 once built).

    Flower 1.42 runs every message in a new ClientApp process (``flwr-clientapp`` pulls one task per process, in
    either isolation mode), so a deployment round pays both on every node; the ServerApp reports their maximum.
    """
    build = sum(_BUILD_SECONDS.values())
    _BUILD_SECONDS.clear()
    return {"process-seconds": time.time() - psutil.Process().create_time(), "build-seconds": build}


def partition_of(context: Context, num_clients: int) -> int:
    """The client id this SuperNode serves (its ``partition-id``).

    Raises:
        ValueError: if the node was started without ``partition-id`` / ``num-partitions`` or they disagree with the
            config's ``num_clients``.
    """
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            'privtune ClientApp: start the SuperNode with --node-config "partition-id=<i> num-partitions=<N>" '
            f"(N = the config's num_clients = {num_clients}); got node config {dict(node)}."
        )
    pid, parts = int(node["partition-id"]), int(node["num-partitions"])  # type: ignore[arg-type]
    if parts != num_clients or not 0 <= pid < num_clients:
        raise ValueError(
            f"privtune ClientApp: node config partition-id={pid} num-partitions={parts} does not fit the config's "
            f"num_clients={num_clients}; use num-partitions={num_clients} and partition-id in 0..{num_clients - 1}."
        )
    return pid


def _first_batch(loader: Any, size: int) -> Any:
    """The first ``size`` examples of the client's shard, collated (the examples the round loop scores)."""
    items = [loader.dataset[i] for i in range(min(size, len(loader.dataset)))]
    return loader.collate_fn(items)


def _prompt_name(side: ClientSide) -> str | None:
    return side.client.prompt_name if not missing_members(side.client, PartialPromptClient) else None


def _load_state(context: Context, side: ClientSide, view: CommunicatedView) -> ClientState:
    record = context.state.config_records.get(STATE_KEY)
    if record is None:  # never trained: the initial prompt, as the round loop's ClientStore hands it out
        return ClientState(prompt=view.personal(side.initial))
    return client_state_from_bytes(record["client_state"])  # type: ignore[arg-type]


def _view(config: ConfigRecord) -> CommunicatedView:
    name = str(config["prompt-name"])
    personal = bool(config.get("personal-layers", True))
    return CommunicatedView(name or None, [int(i) for i in config["selected"]], personal)  # type: ignore[union-attr]


def make_client_app(config: str | Path | None = None) -> ClientApp:
    """A ``ClientApp`` for the privtune config at ``config`` (``None``: the run config's ``config`` entry)."""
    app = ClientApp()

    def side_and_id(msg: Message, context: Context) -> tuple[ClientSide, int]:
        path = config_path(config, context.run_config)
        partial = bool(msg.content["config"]["partial"])
        side = _side(path, partial)
        return side, partition_of(context, int(side.data.num_clients))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        side, cid = side_and_id(msg, context)
        cfg = msg.content["config"]
        prompt_name = _prompt_name(side)
        metrics: dict[str, Any] = {
            "partition-id": cid,
            "num-partitions": int(side.data.num_clients),
            "num-examples": int(side.data.client_num_examples(cid)),
            "num-prompt-layers": int(side.client.num_prompt_layers) if prompt_name else 0,
        }
        if bool(cfg["score-layers"]):
            seed = int(cfg["seed"])  # type: ignore[arg-type]
            params = side.client.client_parameters()
            with torch.no_grad():
                for name, value in side.initial.items():
                    params[name].copy_(value)
            side.client.train()
            batch = _first_batch(side.data.client_train_loader(cid, seed), int(cfg["scoring-batch-size"]))  # type: ignore[arg-type]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(client_seed(seed, 0, cid))
                scores = client_layer_scores(side.client.hidden_states(batch))  # type: ignore[attr-defined]
            metrics["layer-scores"] = [float(s) for s in scores]
        content = RecordDict(
            {
                "metrics": MetricRecord(metrics),
                "info": ConfigRecord({"prompt-name": prompt_name or ""}),
                "initial": to_record(side.initial),
            }
        )
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        side, cid = side_and_id(msg, context)
        cfg = msg.content["config"]
        view = _view(cfg)
        local = local_config_from_record(msg.content["local"])
        global_state = from_record(msg.content["arrays"])
        control = from_record(msg.content["control"]) if "control" in msg.content.array_records else None
        round_idx, run_seed = int(cfg["round"]), int(cfg["seed"])  # type: ignore[arg-type]
        start = time.perf_counter()
        seed = client_seed(run_seed, round_idx, cid)
        loader = side.data.client_train_loader(cid, seed)
        max_steps = None
        straggler = float(cfg["straggler-steps-fraction"])  # type: ignore[arg-type]
        if straggler > 0:  # the round loop's straggler rule, on the loader only this node knows
            full = len(loader) * local.local_epochs
            if local.max_steps:
                full = min(full, local.max_steps)
            max_steps = max(1, math.floor(straggler * full))
        eta_l = cfg.get("eta-l")
        result = local_round(
            side.client,
            view,
            global_state,
            _load_state(context, side, view),
            loader,
            local,
            seed=seed,
            proximal_mu=float(cfg["proximal-mu"]),  # type: ignore[arg-type]
            control_variate=control,
            eta_l=None if eta_l is None else float(eta_l),  # type: ignore[arg-type]
            max_steps=max_steps,
        )
        context.state[STATE_KEY] = ConfigRecord({"client_state": client_state_to_bytes(result.state)})
        seconds = time.perf_counter() - start
        content = RecordDict(
            {
                "arrays": to_record(result.upload),
                "metrics": MetricRecord(
                    {
                        "num-examples": int(side.data.client_num_examples(cid)),
                        "num-steps": int(result.num_steps),
                        "seconds": float(seconds),
                        **_startup_metrics(),
                    }
                ),
            }
        )
        if result.extras:
            content["extras"] = to_record(result.extras)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        side, cid = side_and_id(msg, context)
        cfg = msg.content["config"]
        view = _view(cfg)
        global_state = from_record(msg.content["arrays"])
        client = side.client
        # personalised: this node's own prompt; global: the initial prompt (the global model alone)
        personalised = bool(cfg.get("personalised", True))
        own = _load_state(context, side, view).prompt if personalised else view.personal(side.initial)
        correct = total = 0
        with torch.no_grad():
            client.eval()
            view.load(client.client_parameters(), own, global_state)
            for batch in side.data.client_eval_loader(cid):
                c, t = client.evaluate_batch(batch)
                correct += int(c)
                total += int(t)
            client.train()
        return Message(RecordDict({"metrics": MetricRecord({"correct": correct, "total": total})}), reply_to=msg)

    return app


app = make_client_app()  # `clientapp = "privtune.flower.client_app:app"`: the config comes from the run config
