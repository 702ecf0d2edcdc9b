"""The federated Strategy in one process: rounds, accounting, baselines, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from privtune.federated import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Scaffold, ServerOptimizer
from privtune.strategies import FederatedConfig, FederatedSimulation, final_prompt
from tests.ddp_scripts.fed_common import make_data, make_trainer, run, write_csv


def test_fedpeptao_round_loop_accounting_and_report(tmp_path: Path) -> None:
    trainer, strategy = run(tmp_path, layers="fedpeptao", num_selected_layers=2, report_dir=str(tmp_path / "rep"))
    runner = strategy.loop
    assert runner.round == 3
    assert len(runner.selected) == 2
    assert runner.layer_scores[-1] == 0.0
    # tiny-llama: P = 2, H_kv = 2 * 8; 2 layers -> 2 * 2 * 2 * 16 = 128 elements, 3 of 6 clients per round
    rec = runner.ledger.rounds[0]
    assert rec.num_transfer_params == 128
    assert rec.up_bytes == rec.down_bytes == 4 * 128 * 3
    assert 0 < rec.round_seconds <= rec.serial_seconds  # slowest client <= sum over clients
    assert 0.0 <= runner.history[-1]["fed/personalized_acc"] <= 1.0
    assert not torch.equal(final_prompt(strategy)["prefix"], runner.store.initial_prompt[:, runner.selected])
    # unselected layers stay personalised: two clients that trained differ there
    trained = list(runner.store.clients.values())
    unselected = [i for i in range(4) if i not in runner.selected]
    assert not torch.equal(trained[0].prompt[:, unselected], trained[1].prompt[:, unselected])
    for name in ("report.json", "report.md", "accuracy.png"):
        assert (tmp_path / "rep" / name).exists()


BASELINES = {
    "fedavg": (FedAvg, 0.0),
    "fedavgm": (FedAvgM, 0.0),
    "fedprox": (FedAvg, 0.01),
    "scaffold": (Scaffold, 0.0),
    "fedadam": (FedAdam, 0.0),
    "fedyogi": (FedYogi, 0.0),
    "fedadagrad": (FedAdagrad, 0.0),
}


@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_runs_on_an_encoder(tmp_path: Path, name: str) -> None:
    # the trained linear head is federated with the prefix
    cls, mu = BASELINES[name]
    server: ServerOptimizer = cls()
    _, strategy = run(
        tmp_path, model="tiny-bert", encoder_head="linear", server=server, proximal_mu=mu, num_rounds=2, client_lr=0.04
    )
    runner = strategy.loop
    assert runner.round == 2
    assert set(runner.global_state) == {"prefix", "head.weight", "head.bias"}
    factor = 2 if name == "scaffold" else 1
    assert runner.ledger.rounds[0].num_transfer_params == factor * runner.elements_per_client()
    assert server.round == 0  # the run steps its own copy; the configured object stays as built


def test_label_name_head_sends_the_prefix_slices_only(tmp_path: Path) -> None:
    _, strategy = run(tmp_path, model="tiny-bert", layers="fedpeptao", num_selected_layers=1, num_rounds=2)
    runner = strategy.loop
    assert set(runner.global_state) == {"prefix"}
    # spec §11: P * |sel| * 2 * H_kv elements per client and direction (tiny-bert: P = 2, H_kv = 32)
    prefix = runner.global_state["prefix"]
    assert runner.elements_per_client() == prefix.numel() == 2 * 1 * 2 * prefix.shape[-1]


def test_dropout_and_stragglers(tmp_path: Path) -> None:
    _, strategy = run(
        tmp_path, num_clients=6, sample_fraction=1.0, dropout_fraction=0.34, straggler_fraction=0.5, num_rounds=1
    )
    rec = strategy.loop.ledger.rounds[0]
    assert len(rec.clients) == 6
    assert len(rec.reported) == 4
    assert rec.up_bytes == 4 * rec.num_transfer_params * 4
    assert rec.down_bytes == 4 * rec.num_transfer_params * 6


class _Killed(RuntimeError):
    pass


class _KillMidRound(FederatedSimulation):
    def on_client_end(self, round_idx: int, client: int) -> None:
        super().on_client_end(round_idx, client)
        if round_idx == 2:
            raise _Killed(f"killed in round {round_idx} after client {client}")


def test_kill_mid_round_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    fed = {"layers": "fedpeptao", "num_selected_layers": 2, "num_rounds": 3}
    (tmp_path / "a").mkdir()
    _, full = run(tmp_path / "a", **fed)
    ckpt = tmp_path / "b" / "round.ckpt"
    (tmp_path / "b").mkdir()
    with pytest.raises(_Killed):
        run(tmp_path / "b", strategy_cls=_KillMidRound, round_checkpoint=str(ckpt), **fed)
    state = torch.load(ckpt, weights_only=True)["federated"]  # plain data: loads without unpickling objects
    assert state["round"] == 1
    assert len(state["pending"]["updates"]) == 1  # one client of round 2 done before the kill
    from privtune.modules.prompt_tuning import PromptTuning

    strategy = FederatedSimulation(federated=FederatedConfig(sample_fraction=0.5, local_max_steps=2, **fed))
    trainer = make_trainer(strategy, tmp_path / "b")
    data = make_data(tmp_path / "b" / "data.csv")
    trainer.fit(PromptTuning(model="tiny-llama", num_virtual_tokens=2, seed=0), datamodule=data, ckpt_path=str(ckpt))
    assert strategy.loop.round == 3
    torch.testing.assert_close(final_prompt(strategy)["prefix"], final_prompt(full)["prefix"], rtol=0, atol=0)
    for cid, c in full.loop.store.clients.items():
        torch.testing.assert_close(strategy.loop.store.clients[cid].prompt, c.prompt, rtol=0, atol=0)
        exp_avg = c.optimizer["state"][0]["exp_avg"]
        torch.testing.assert_close(strategy.loop.store.clients[cid].optimizer["state"][0]["exp_avg"], exp_avg)
    assert strategy.loop.server.state_dict()["eta_s"] == full.loop.server.state_dict()["eta_s"]


def test_bad_input_fails_before_work(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "data.csv")
    with pytest.raises(ValueError, match=r"`num_clients=30` exceeds the 24 examples"):
        make_data(csv_path, num_clients=30)
    with pytest.raises(ValueError, match=r"`alpha`.*got 0"):
        make_data(csv_path, alpha=0.0)
    with pytest.raises(ValueError, match=r"`sample_fraction` must be in \(0, 1\]; got 1.5"):
        FederatedConfig(sample_fraction=1.5)
    with pytest.raises(ValueError, match=r"`sample_fraction` must be in \(0, 1\]; got 0"):
        FederatedConfig(sample_fraction=0.0)
    with pytest.raises(ValueError, match="`num_selected_layers=9` exceeds the model's 4 prompt layers"):
        run(tmp_path, layers="fedpeptao", num_selected_layers=9)
    with pytest.raises(ValueError, match=r"`selected_layers` has \[7\]"):
        run(tmp_path, layers="list", selected_layers=[0, 7])
    from privtune.modules.prompt_tuning import PromptTuning

    trainer = make_trainer(FederatedSimulation(), tmp_path)
    module, plain = PromptTuning(model="tiny-llama", num_virtual_tokens=2), make_data(csv_path).inner
    with pytest.raises(ValueError, match="client-partitioned datamodule"):
        trainer.fit(module, datamodule=plain)


def test_slq_chooses_how_many_layers(tmp_path: Path) -> None:
    _, strategy = run(tmp_path, layers="fedpeptao", selection_ratio=None, slq_iterations=8, num_rounds=1)
    runner = strategy.loop
    assert runner.ratio is not None
    assert 0.0 <= runner.ratio <= 1.0
    assert len(runner.selected) == max(1, min(4, round(runner.ratio * 4)))


class _Payload:
    """A pickled object that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_resume_is_refused_for_another_client_count_or_server_and_never_unpickles(tmp_path: Path) -> None:
    from privtune.federated import FedAdam
    from privtune.modules.prompt_tuning import PromptTuning

    ckpt = tmp_path / "a" / "run.ckpt"
    (tmp_path / "a").mkdir()
    trainer, _ = run(tmp_path / "a", num_rounds=1)
    trainer.save_checkpoint(str(ckpt))
    assert "federated" in torch.load(ckpt, weights_only=True)  # the federated state is plain data

    def resume(num_clients: int = 6, **fed: object) -> None:
        strategy = FederatedSimulation(federated=FederatedConfig(sample_fraction=0.5, local_max_steps=2, **fed))
        data = make_data(write_csv(tmp_path / "data.csv"), num_clients=num_clients)
        module = PromptTuning(model="tiny-llama", num_virtual_tokens=2, seed=0)
        make_trainer(strategy, tmp_path / "b").fit(module, datamodule=data, ckpt_path=str(ckpt))

    with pytest.raises(ValueError, match=r"`num_clients`: checkpoint 6, this run 4"):
        resume(num_clients=4, num_rounds=2)
    with pytest.raises(ValueError, match=r"`server`: checkpoint '.*FedPepTAOServer', this run '.*FedAdam'"):
        resume(num_rounds=2, server=FedAdam())
    # a checkpoint carrying a pickled object is refused before the object runs
    evil = tmp_path / "evil.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["payload"] = _Payload(tmp_path / "pwned")
    torch.save(checkpoint, evil)
    ckpt = evil
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        resume(num_rounds=2)
    assert not (tmp_path / "pwned").exists()


def test_client_level_dp_through_the_strategy_reports_epsilon_per_round(tmp_path: Path) -> None:
    import json

    from privtune.federated.client_dp import ClientLevelDP

    dp = ClientLevelDP(clipping_norm=0.5, target_epsilon=8.0, delta=1e-3)
    _, strategy = run(tmp_path, num_clients=12, client_dp=dp, report_dir=str(tmp_path / "rep"))
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    eps = [h["privacy/epsilon"] for h in report["history"]]
    assert len(eps) == 3 and eps == sorted(eps) and eps[-1] <= 8.0
    assert report["client_dp"]["target_epsilon"] == 8.0 and report["client_dp"]["clients_per_round"] == 6
    assert report["client_dp"]["sample_rate"] == 0.5
    assert "| " in (tmp_path / "rep" / "report.md").read_text()
