"""privtune's round loop as a Flower app: the global prompt and the bytes equal the in-process simulation.

The ServerApp and ClientApp are run (a) over an in-process grid that hands each message to the ClientApp of the
addressed node (fast; every server optimizer, FedProx, client-level DP), and (b) under Flower's own simulation
engine, ``flwr.simulation.run_simulation`` (Ray).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

flwr = pytest.importorskip("flwr")
from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from privtune.federated.loop import FederatedLoop  # noqa: E402
from privtune.flower.client_app import make_client_app  # noqa: E402
from privtune.flower.run import build_client_side, federated_config, read_config  # noqa: E402
from privtune.flower.server_app import FlowerRunError, FlowerServer, make_server_app  # noqa: E402
from tests.ddp_scripts.fed_common import write_csv  # noqa: E402


def write_config(tmp: Path, server: dict[str, Any] | None = None, num_clients: int = 3, **federated: Any) -> Path:
    """A privtune federated config (the train.py format) on the tiny Llama and a generated CSV."""
    csv_path = write_csv(tmp / "data.csv")
    fed = {
        "server": server or {"class_path": "privtune.federated.FedPepTAOServer"},
        "layers": "fedpeptao",
        "num_selected_layers": 2,
        "num_rounds": 2,
        "sample_fraction": 0.5,
        "local_max_steps": 2,
        "client_lr": 0.04,
        "seed": 42,
        **federated,
    }
    config = {
        "seed_everything": 0,
        "trainer": {
            "strategy": {"class_path": "privtune.strategies.FederatedSimulation", "init_args": {"federated": fed}}
        },
        "model": {
            "class_path": "privtune.modules.prompt_tuning.PromptTuning",
            "init_args": {"model": "tiny-llama", "num_virtual_tokens": 2, "seed": 0},
        },
        "data": {
            "class_path": "privtune.datamodules.federated.FederatedDataModule",
            "init_args": {
                "num_clients": num_clients,
                "alpha": 0.5,
                "seed": 1,
                "datamodule": {
                    "class_path": "privtune.datamodules.TextFile",
                    "init_args": {
                        "path": str(csv_path),
                        "template": "Tweet: {text}\nSentiment:",
                        "label_words": [" negative", " positive"],
                        "train_size": 24,
                        "val_size": 4,
                        "test_size": 12,
                        "max_length": 24,
                        "batch_size": 4,
                        "seed": 0,
                    },
                },
            },
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def in_process(path: Path) -> FederatedLoop:
    """privtune's in-process simulation of the same config: the core loop over one client model."""
    raw = read_config(path)
    cfg = federated_config(raw)
    side = build_client_side(raw, partial=cfg.layers != "all")
    loop = FederatedLoop(cfg)
    loop.setup(side.client, side.data)
    while loop.run_round():
        pass
    return loop


class InProcessGrid:
    """A Flower ``Grid`` stand-in: each message goes to the ClientApp of its node, with that node's context."""

    def __init__(self, client_app: Any, num_nodes: int, node_config: dict[int, dict[str, Any]] | None = None) -> None:
        self.client_app = client_app
        self.contexts = {}
        for i in range(num_nodes):
            node_id = 1000 + 7 * i
            config = (node_config or {}).get(i, {"partition-id": i, "num-partitions": num_nodes})
            self.contexts[node_id] = Context(
                run_id=1, node_id=node_id, node_config=config, state=RecordDict(), run_config={}
            )
        self.sent: list[str] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in reversed(messages):  # any order: the server must match replies to clients itself
            self.sent.append(msg.metadata.message_type)
            try:
                replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as ex:  # as a SuperNode reports a ClientApp's exception (flwr's run_clientapp)
                replies.append(Message(Error(code=1, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg))
        return replies


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run/node/task ids Flower sets in a ServerApp process (messages need them)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def run_over_grid(path: Path, num_nodes: int = 3, **kwargs: Any) -> tuple[FlowerServer, InProcessGrid]:
    raw = read_config(path)
    server = FlowerServer(federated_config(raw), 3, node_wait_seconds=1, reproducible_noise=True)
    grid = InProcessGrid(make_client_app(path), num_nodes, **kwargs)
    server.run(grid)  # type: ignore[arg-type]
    return server, grid


def assert_same_run(flower: FederatedLoop, reference: FederatedLoop) -> None:
    assert flower.round == reference.round
    assert flower.selected == reference.selected
    assert set(flower.global_state) == set(reference.global_state)
    for name, value in reference.global_state.items():
        torch.testing.assert_close(flower.global_state[name], value, rtol=0, atol=1e-6)
    assert flower.ledger.summary()["up_bytes"] == reference.ledger.summary()["up_bytes"]
    assert flower.ledger.summary()["down_bytes"] == reference.ledger.summary()["down_bytes"]
    assert [r.reported for r in flower.ledger.rounds] == [r.reported for r in reference.ledger.rounds]
    for key in ("fed/personalized_acc", "fed/global_acc"):
        assert [h.get(key) for h in flower.history] == [h.get(key) for h in reference.history]


SERVERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "fedpeptao": ({"class_path": "privtune.federated.FedPepTAOServer"}, {}),
    "fedavg-all-layers": ({"class_path": "privtune.federated.FedAvg"}, {"layers": "all"}),
    "fedavgm": ({"class_path": "privtune.federated.FedAvgM", "init_args": {"server_momentum": 0.9}}, {}),
    "fedadam": ({"class_path": "privtune.federated.FedAdam"}, {}),
    "fedyogi": ({"class_path": "privtune.federated.FedYogi"}, {}),
    "fedadagrad": ({"class_path": "privtune.federated.FedAdagrad"}, {}),
    "fedprox": ({"class_path": "privtune.federated.FedAvg"}, {"proximal_mu": 0.01}),
    "no-personal-layers": ({"class_path": "privtune.federated.FedAvg"}, {"personal_layers": False}),
    "scaffold": ({"class_path": "privtune.federated.Scaffold"}, {"layers": "list", "selected_layers": [0, 3]}),
    "stragglers-and-dropout": (
        {"class_path": "privtune.federated.FedAvg"},
        {"sample_fraction": 1.0, "dropout_fraction": 0.34, "straggler_fraction": 0.5, "num_rounds": 3},
    ),
}


@pytest.mark.slow
@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("name", list(SERVERS))
def test_every_server_optimizer_equals_the_in_process_loop(tmp_path: Path, name: str) -> None:
    server_cfg, extra = SERVERS[name]
    path = write_config(tmp_path, server=server_cfg, **extra)
    server, grid = run_over_grid(path)
    reference = in_process(path)
    assert_same_run(server.loop, reference)
    assert grid.sent[:3] == ["query"] * 3 and "train" in grid.sent and "evaluate" in grid.sent
    # Flower's records carry the same float32 payload plus names and array headers
    for h, rec in zip(server.loop.history, server.loop.ledger.rounds):
        assert h["flower/up_record_bytes"] >= rec.up_bytes > 0


@pytest.mark.usefixtures("server_identity")
def test_client_level_dp_over_flower_equals_the_in_process_loop(tmp_path: Path) -> None:
    dp = {"clipping_norm": 0.05, "noise_multiplier": 0.8, "delta": 1e-3}
    path = write_config(tmp_path, server={"class_path": "privtune.federated.FedAdam"}, client_dp=dp, num_rounds=3)
    server, _ = run_over_grid(path)
    reference = in_process(path)
    assert_same_run(server.loop, reference)
    assert server.loop.client_dp is not None and server.loop.client_dp.rounds == 3
    assert server.loop.history[-1]["privacy/epsilon"] == pytest.approx(reference.history[-1]["privacy/epsilon"])


@pytest.mark.usefixtures("server_identity")
def test_client_level_dp_noise_is_secret_on_real_nodes(tmp_path: Path) -> None:
    """Without ``reproducible_noise`` the noise does not follow from the (public) config seed."""
    dp = {"clipping_norm": 0.05, "noise_multiplier": 0.8, "delta": 1e-3}
    path = write_config(tmp_path, server={"class_path": "privtune.federated.FedAvg"}, client_dp=dp, num_rounds=1)
    raw = read_config(path)
    finals = []
    for _ in range(2):
        server = FlowerServer(federated_config(raw), 3, node_wait_seconds=1)
        server.run(InProcessGrid(make_client_app(path), 3))  # type: ignore[arg-type]
        finals.append(server.loop.global_state["prefix"])
    assert not torch.equal(finals[0], finals[1])


@pytest.mark.usefixtures("server_identity")
def test_nodes_without_a_usable_partition_are_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with pytest.raises(FlowerRunError, match="partition-id=<i> num-partitions=<N>"):
        run_over_grid(path, node_config={1: {}})
    with pytest.raises(FlowerRunError, match="num-partitions=3"):
        run_over_grid(path, node_config={2: {"partition-id": 2, "num-partitions": 4}})
    with pytest.raises(FlowerRunError, match="two SuperNodes serve partition-id=0"):
        run_over_grid(path, node_config={1: {"partition-id": 0, "num-partitions": 3}})
    with pytest.raises(FlowerRunError, match="3 SuperNodes connected|2 SuperNodes connected"):
        run_over_grid(path, num_nodes=2)


def test_configuration_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run config `config`"):
        read_config(tmp_path / "missing.yaml")
    (tmp_path / "plain.yaml").write_text("model: {}\ndata: {}\n")
    with pytest.raises(ValueError, match="trainer.strategy.init_args.federated"):
        read_config(tmp_path / "plain.yaml")
    path = write_config(tmp_path, selection_ratio=None, num_selected_layers=None)
    with pytest.raises(ValueError, match="selection_ratio"):
        FlowerServer(federated_config(read_config(path)), 3)


@pytest.mark.slow
def test_run_simulation_equals_the_in_process_loop(tmp_path: Path) -> None:
    """Flower's simulation engine (Ray actors, one ClientApp per virtual SuperNode) gives the same global prompt."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray (flwr[simulation])")
    from flwr.simulation import run_simulation

    path = write_config(tmp_path)
    out = tmp_path / "flower"
    run_simulation(
        server_app=make_server_app(path, output_dir=out),
        client_app=make_client_app(path),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    reference = in_process(path)
    final = torch.load(out / "global_prompt.pt", weights_only=True)
    assert set(final) == set(reference.global_state)
    for name, value in reference.global_state.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["selected_layers"] == reference.selected
    assert report["ledger"]["up_bytes"] == reference.ledger.summary()["up_bytes"] > 0
    assert report["ledger"]["down_bytes"] == reference.ledger.summary()["down_bytes"]


def test_without_flwr_the_import_names_the_extra(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'flwr':\n"
        "            raise ImportError('flwr is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import privtune.flower\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode != 0
    assert "pip install 'privtune[flower]'" in out.stderr
