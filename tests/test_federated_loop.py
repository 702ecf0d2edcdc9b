"""The core round loop without Lightning: a toy client and toy data, client-level DP inside the loop, resume
safety (another client count, server, layer selection, seed or privacy setting is refused) and plain-data state."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from privtune.federated import (
    ClientState,
    ClientUpdate,
    CommunicatedView,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FederatedClient,
    FederatedConfig,
    FederatedLoop,
    FedPepTAOServer,
    FedYogi,
    PartialPromptClient,
    ResumeMismatchError,
    Scaffold,
    ServerOptimizer,
    client_seed,
    local_round,
)
from privtune.federated.client_dp import ClientLevelDP
from privtune.federated.loop import straggler_max_steps

P, L, H = 2, 3, 4


class ToyClient(nn.Module):
    """A partial-prompt client: ``prefix [P, L, H]`` (layers on axis 1) and a ``head [H]``; quadratic loss."""

    prompt_name = "prefix"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.prefix = nn.Parameter(0.1 * torch.randn(P, L, H, generator=g))
        self.head = nn.Parameter(torch.zeros(H))
        self.drop = nn.Dropout(0.1)

    @property
    def num_prompt_layers(self) -> int:
        return L

    def client_parameters(self) -> dict[str, Tensor]:
        return {"prefix": self.prefix, "head": self.head}

    def _out(self, x: Tensor) -> Tensor:
        return self.drop(self.prefix.sum(dim=(0, 1))) + self.head  # [H]

    def client_loss(self, batch: list[Tensor]) -> Tensor:
        return ((self._out(batch[0]) - batch[0]) ** 2).sum(-1).mean()

    def evaluate_batch(self, batch: list[Tensor]) -> tuple[int, int]:
        err = ((self._out(batch[0]) - batch[0]) ** 2).sum(-1)
        return int((err < 1.0).sum()), len(batch[0])

    def hidden_states(self, batch: list[Tensor]) -> tuple[Tensor, ...]:
        x = batch[0]
        return tuple(x + i * self.prefix[:, min(i, L - 1)].sum(0) for i in range(L + 1))


class ToyData:
    """``num_clients`` clients with different sizes and means (label skew's analogue)."""

    def __init__(self, num_clients: int = 6) -> None:
        self.num_clients = num_clients
        g = torch.Generator().manual_seed(1)
        self.x = [torch.randn(4 + 2 * c, H, generator=g) + c / num_clients for c in range(num_clients)]

    def client_train_loader(self, client_id: int, seed: int) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(self.x[client_id]), batch_size=2, shuffle=True, generator=gen)

    def client_eval_loader(self, client_id: int) -> DataLoader:
        return DataLoader(TensorDataset(self.x[client_id]), batch_size=4)

    def client_num_examples(self, client_id: int) -> int:
        return len(self.x[client_id])


def _config(**kw: Any) -> FederatedConfig:
    base: dict[str, Any] = {
        "num_rounds": 3,
        "sample_fraction": 0.5,
        "layers": "list",
        "selected_layers": [0, 2],
        "local_max_steps": 2,
        "client_lr": 0.05,
    }
    return FederatedConfig(**{**base, **kw})


def _run(config: FederatedConfig, data: ToyData | None = None) -> FederatedLoop:
    loop = FederatedLoop(config)
    loop.setup(ToyClient(), data or ToyData())
    while loop.run_round():
        pass
    return loop


def test_the_loop_runs_a_plain_pytorch_client() -> None:
    assert isinstance(ToyClient(), PartialPromptClient) and isinstance(ToyClient(), FederatedClient)
    loop = _run(_config())
    assert loop.round == 3 and len(loop.history) == 3
    # the communicated state: the selected layers' slices and the head; unselected layers stay on the clients
    assert loop.global_state["prefix"].shape == (P, 2, H) and loop.global_state["head"].shape == (H,)
    assert loop.elements_per_client() == P * 2 * H + H
    rec = loop.ledger.rounds[0]
    assert rec.up_bytes == 4 * loop.elements_per_client() * 3
    trained = [c for c in loop.store.clients.values() if c.prompt is not None]
    assert not torch.equal(trained[0].prompt[:, 1], trained[1].prompt[:, 1])  # personal layer 1 differs
    # the configured server object is never stepped: the loop works on a bound copy
    assert loop.config.server.round == 0 and loop.server.round == 3


def test_a_client_missing_a_protocol_member_is_named() -> None:
    class NoEval(nn.Module):
        def client_parameters(self) -> dict[str, Tensor]:
            return {}

        def client_loss(self, batch: Any) -> Tensor:
            return torch.zeros(())

    with pytest.raises(TypeError, match=r"implementing `FederatedClient`; `NoEval` lacks \['evaluate_batch'\]"):
        FederatedLoop(_config(layers="all")).setup(NoEval(), ToyData())
    with pytest.raises(TypeError, match=r"`PartialPromptClient` \(the `layers`.*\['evaluate_batch', 'prompt_name'"):
        FederatedLoop(_config()).setup(NoEval(), ToyData())
    with pytest.raises(ValueError, match=r"client-partitioned datamodule.*`list` lacks \['num_clients'"):
        FederatedLoop(_config()).setup(ToyClient(), [])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- client-level DP
def test_client_dp_clips_each_update_and_averages_uniformly() -> None:
    # noise 0 and FedAvg: the new global state is g + (1/m) sum_i clip(w_i - g), whatever the client sizes
    clip = 0.05
    config = _config(num_rounds=1, server=FedAvg(), client_dp=ClientLevelDP(clipping_norm=clip, noise_multiplier=0.0))
    loop = FederatedLoop(config)
    loop.setup(ToyClient(), ToyData())
    g0 = {k: v.clone() for k, v in loop.global_state.items()}
    uploads: list[dict[str, Tensor]] = []
    loop.on_client_end = lambda r, c: uploads.append(loop.pending["updates"][c].state)
    loop.run_round()
    m = len(uploads)
    assert m == 3
    deltas = [{k: u[k] - g0[k] for k in g0} for u in uploads]
    norms = [math.sqrt(sum(float((d**2).sum()) for d in delta.values())) for delta in deltas]
    assert min(norms) > clip  # every update was clipped
    expected = {k: g0[k] + sum(d[k] * (clip / n) for d, n in zip(deltas, norms)) / m for k in g0}
    for k in g0:
        torch.testing.assert_close(loop.global_state[k], expected[k], rtol=1e-5, atol=1e-7)
    assert loop.history[-1]["privacy/epsilon"] == math.inf  # no noise: no guarantee, and the report says so


@pytest.mark.parametrize(
    "server",
    [FedAvg(), FedAvgM(server_momentum=0.9), FedAdam(), FedYogi(), FedAdagrad(), FedPepTAOServer()],
    ids=lambda s: type(s).__name__,
)
def test_client_dp_with_a_target_never_overspends(server: ServerOptimizer) -> None:
    # 12 clients, 6 per round (q = 0.5), delta << 1/N
    dp = ClientLevelDP(clipping_norm=0.1, target_epsilon=8.0, delta=1e-3)
    loop = _run(_config(num_rounds=4, server=server, client_dp=dp), ToyData(12))
    eps = [h["privacy/epsilon"] for h in loop.history]
    assert len(eps) == 4 and eps == sorted(eps) and eps[0] > 0
    assert eps[-1] <= 8.0
    assert dp.rounds == 0  # the configured object is not spent; the run accounts on its copy
    report = loop.report()
    assert report["client_dp"]["epsilon"] == eps[-1] and report["stop_reason"] is None


def test_client_dp_stops_before_the_round_that_would_overspend() -> None:
    dp = ClientLevelDP(clipping_norm=0.1, noise_multiplier=1.0, delta=1e-3)
    loop = FederatedLoop(_config(num_rounds=5, client_dp=dp))
    loop.setup(ToyClient(), ToyData(12))
    loop.run_round()
    loop.run_round()
    spent = loop.client_dp.epsilon()
    loop.client_dp.target_epsilon = spent  # a budget the third round would exceed
    assert loop.run_round() == {}
    assert loop.round == 2 and loop.client_dp.rounds == 2
    assert loop.stop_reason is not None and "round 3 would spend epsilon" in loop.stop_reason
    assert loop.run_round() == {}  # stays stopped


def test_client_dp_refuses_scaffold_whose_extras_it_cannot_cover() -> None:
    with pytest.raises(ValueError, match=r"`client_dp` cannot protect `server: Scaffold`.*control-variate"):
        _config(server=Scaffold(), client_dp=ClientLevelDP(clipping_norm=0.1, noise_multiplier=1.0))


# ---------------------------------------------------------------------------------------------- resume safety
def _state_bytes(loop: FederatedLoop) -> bytes:
    buf = io.BytesIO()
    torch.save(loop.state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "server",
    [FedPepTAOServer(), Scaffold(), FedAdam()],
    ids=lambda s: type(s).__name__,
)
def test_state_is_plain_data_and_resumes_exactly(server: ServerOptimizer) -> None:
    dp = None if isinstance(server, Scaffold) else ClientLevelDP(clipping_norm=0.5, noise_multiplier=0.5, delta=1e-3)
    full = _run(_config(num_rounds=3, server=server, client_dp=dp), ToyData(12))
    part = FederatedLoop(_config(num_rounds=3, server=server, client_dp=dp))
    part.setup(ToyClient(), ToyData(12))
    part.run_round()
    state = torch.load(io.BytesIO(_state_bytes(part)), weights_only=True)  # no pickled objects anywhere
    resumed = FederatedLoop(_config(num_rounds=3, server=server, client_dp=dp))
    resumed.restore_later(state)
    resumed.setup(ToyClient(), ToyData(12))
    while resumed.run_round():
        pass
    for k, v in full.global_state.items():
        torch.testing.assert_close(resumed.global_state[k], v, rtol=0, atol=0)
    if dp is not None:
        assert resumed.client_dp.rounds == 3 and resumed.client_dp.epsilon() == full.client_dp.epsilon()


MISMATCHES = {
    "client count": ({}, {"num_clients": 8}, "`num_clients`: checkpoint 6, this run 8"),
    "server class": (
        {},
        {"server": FedAdam()},
        "`server`: checkpoint 'privtune.federated.fedpeptao.FedPepTAOServer', this run "
        "'privtune.federated.fedopt.FedAdam'",
    ),
    "server arguments": ({"server": FedAdam(eta=0.1)}, {"server": FedAdam(eta=0.2)}, "`server_args`: checkpoint"),
    "layer selection": ({}, {"selected_layers": [0, 1]}, "`selected_layers`: checkpoint [0, 2], this run [0, 1]"),
    "seed": ({}, {"seed": 7}, "`seed`: checkpoint 42, this run 7"),
    "personal layers": ({}, {"personal_layers": False}, "`personal_layers`: checkpoint True, this run False"),
    "client dp": (
        {},
        {"client_dp": ClientLevelDP(clipping_norm=0.1, noise_multiplier=1.0)},
        "`client_dp`: checkpoint None, this run {'clipping_norm': 0.1",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_resume_from_another_run_setting_is_refused(case: str) -> None:
    before, after, message = MISMATCHES[case]
    num_clients = after.pop("num_clients", 6)
    loop = FederatedLoop(_config(**before))
    loop.setup(ToyClient(), ToyData())
    loop.run_round()
    state = loop.state_dict()
    other = FederatedLoop(_config(**{**before, **after}))
    other.restore_later(state)
    with pytest.raises(ResumeMismatchError, match=re.escape(message)):
        other.setup(ToyClient(), ToyData(num_clients))


def test_a_state_without_fingerprint_is_refused(tmp_path: Path) -> None:
    loop = FederatedLoop(_config())
    loop.setup(ToyClient(), ToyData())
    state = loop.state_dict()
    del state["fingerprint"]
    other = FederatedLoop(_config())
    other.restore_later(state)
    with pytest.raises(ResumeMismatchError, match="no run fingerprint"):
        other.setup(ToyClient(), ToyData())


@pytest.mark.parametrize("server", [FedPepTAOServer(), Scaffold()], ids=lambda s: type(s).__name__)
def test_server_and_clients_apart_equal_the_in_process_loop(server: ServerOptimizer) -> None:
    # what a Flower app does: the server holds no model or data, each client keeps its own state
    def config() -> FederatedConfig:
        dp = (
            None if isinstance(server, Scaffold) else ClientLevelDP(clipping_norm=0.5, noise_multiplier=0.3, delta=1e-3)
        )
        return _config(server=server, dropout_fraction=0.34, straggler_fraction=0.5, proximal_mu=0.1, client_dp=dp)

    data = ToyData(12)
    full = _run(config(), data)
    client, view = ToyClient(), CommunicatedView("prefix", [0, 2])
    initial = view.personal(client.client_parameters())
    apart = FederatedLoop(config())
    apart.setup_server(12, view.upload(client.client_parameters()), prompt_name="prefix", selected=[0, 2])
    states: dict[int, ClientState] = {}
    stragglers = 0
    for r in range(1, 4):
        plan = apart.plan(r)
        c = apart.server_control_variate()
        updates = []
        for cid in plan.reporting:
            seed = client_seed(apart.config.seed, r, cid)
            loader = data.client_train_loader(cid, seed)
            cap = straggler_max_steps(apart.config, len(loader)) if cid in plan.stragglers else None
            stragglers += cap is not None
            state = states.get(cid, ClientState(prompt=initial.clone()))
            res = local_round(
                client,
                view,
                apart.global_state,
                state,
                loader,
                apart.local,
                seed=seed,
                proximal_mu=apart.config.proximal_mu,
                control_variate=c,
                eta_l=getattr(apart.server, "eta_l", None),
                max_steps=cap,
            )
            states[cid] = res.state
            updates.append(
                ClientUpdate(cid, res.upload, data.client_num_examples(cid), res.num_steps, extras=res.extras)
            )
        apart.aggregate(r, plan, updates)
    assert apart.round == 3 and stragglers > 0
    for k, v in full.global_state.items():
        torch.testing.assert_close(apart.global_state[k], v, rtol=0, atol=0)
    assert apart.ledger.summary()["total_bytes"] == full.ledger.summary()["total_bytes"]


def test_bad_server_settings_are_refused_before_any_round() -> None:
    from privtune.federated import FedPepTAOOptions

    with pytest.raises(ValueError, match=r"`server` must be a privtune.federated.ServerOptimizer.*got 'fedadam'"):
        FederatedConfig(server="fedadam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"give `preset` \('clean'\) or `options`, not both"):
        FedPepTAOServer(preset="clean", options=FedPepTAOOptions())
    with pytest.raises(ValueError, match=r"`proximal_mu` \(FedProx\) must be >= 0; got -0.1"):
        FederatedConfig(proximal_mu=-0.1)
    for server, name in ((FedPepTAOServer(num_clients=5), "FedPepTAOServer"), (Scaffold(num_clients=5), "Scaffold")):
        with pytest.raises(ValueError, match=rf"{name} was built with `num_clients=5` but the data has 6 clients"):
            FederatedLoop(_config(server=server)).setup(ToyClient(), ToyData(6))


def test_server_recommendations_reach_the_clients() -> None:
    clean = FederatedLoop(_config(server=FedPepTAOServer(preset="clean")))
    clean.setup(ToyClient(), ToyData())
    assert clean.local is not None and clean.local.reset_optimizer is True  # FedPepTAO's clean preset
    explicit = FederatedLoop(_config(server=FedPepTAOServer(preset="clean"), reset_local_optimizer=False))
    explicit.setup(ToyClient(), ToyData())
    assert explicit.local is not None and explicit.local.reset_optimizer is False  # the config wins
    adam = FederatedLoop(_config(server=FedAdam(eta_l=0.02), client_lr=None))
    adam.setup(ToyClient(), ToyData())
    assert adam.local is not None and adam.local.lr == 0.02  # FedOpt's recommended client lr
    scaffold = FederatedLoop(_config(server=Scaffold(), client_lr=0.03))
    scaffold.setup(ToyClient(), ToyData())
    assert scaffold.server.eta_l == 0.03  # option II uses the clients' learning rate unless given


def test_without_personal_layers_the_unselected_layers_stay_at_their_initial_values() -> None:
    initial = ToyClient().prefix.detach().clone()
    loop = _run(_config(personal_layers=False, client_weight_decay=0.5))
    trained = [c.prompt for c in loop.store.clients.values()]
    assert trained
    for prompt in trained:
        # layer 1 is not communicated: frozen despite AdamW's weight decay; the selected layers 0 and 2 moved
        assert torch.equal(prompt[:, 1], initial[:, 1])
        assert not torch.equal(prompt[:, [0, 2]], initial[:, [0, 2]])
    # every client's model is the global model: the two accuracies coincide
    assert all(h["fed/global_acc"] == h["fed/personalized_acc"] for h in loop.history)
    personal = _run(_config())
    assert not torch.equal(personal.global_state["prefix"], loop.global_state["prefix"])


def test_global_and_personalised_accuracy_are_reported_separately() -> None:
    loop = _run(_config())
    last = loop.history[-1]
    assert 0.0 <= last["fed/global_acc"] <= 1.0 and 0.0 <= last["fed/personalized_acc"] <= 1.0
    # global: the initial prompt with the global slices, the same for every client
    manual = FederatedLoop(_config())
    manual.setup(ToyClient(), ToyData())
    manual.load_state_dict(loop.state_dict())
    assert manual.evaluate(personalised=False) == last["fed/global_acc"]
    for c in manual.store.clients.values():  # personal layers gone: every client holds the initial prompt
        c.prompt = manual.store.initial_prompt.clone()
    assert manual.evaluate() == last["fed/global_acc"]
    # nothing personal (every tensor communicated): the two numbers coincide
    whole = _run(_config(layers="all", selected_layers=None))
    assert all(h["fed/global_acc"] == h["fed/personalized_acc"] for h in whole.history)


def test_membership_audit_scores_participants_training_data_against_held_out_data() -> None:
    from privtune.attacks.membership import roc_auc
    from privtune.federated.membership import _losses, federated_membership

    loop = _run(_config(num_rounds=2))
    out = federated_membership(loop, max_examples=10, seed=3)
    assert out["n_members"] == out["n_nonmembers"] == 10 and out["participants"] == len(loop.store.clients)
    assert set(out) >= {"global", "personalised"}
    for name in ("global", "personalised"):
        auc = out[name]["attacks"]["loss"]["auc"]
        assert auc["low"] <= auc["value"] <= auc["high"] and "loss" in out[name]["negative_control"]
    # the global report is the loss attack on the global model: recompute it by hand
    data = ToyData()
    rng = __import__("numpy").random.default_rng(3)
    members = [(c, x) for c in sorted(loop.store.clients) for x in TensorDataset(data.x[c])]
    nonmembers = [(c, x) for c in range(6) for x in TensorDataset(data.x[c])]
    members = [members[i] for i in sorted(rng.choice(len(members), 10, replace=False))]
    nonmembers = [nonmembers[i] for i in sorted(rng.choice(len(nonmembers), 10, replace=False))]
    collate = DataLoader(TensorDataset(data.x[0])).collate_fn
    by_hand = roc_auc(-_losses(loop, members, collate, False), -_losses(loop, nonmembers, collate, False))
    assert out["global"]["attacks"]["loss"]["auc"]["value"] == pytest.approx(by_hand)
    # without personal layers nothing is personal: one report
    frozen = _run(_config(num_rounds=1, personal_layers=False))
    assert "personalised" not in federated_membership(frozen, max_examples=4)
    idle = FederatedLoop(_config())
    idle.setup(ToyClient(), ToyData())
    with pytest.raises(ValueError, match="at least one client trained"):
        federated_membership(idle)
