"""Client-level DP (DP-FedAvg): Flower's server-side fixed clipping, Opacus' RDP accounting, never overspent."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from privtune.federated.aggregate import AggregationError
from privtune.federated.client_dp import ClientLevelDP, PrivacyBudgetExhausted, rdp_epsilon, update_norm

flwr = pytest.importorskip("flwr")
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping  # noqa: E402
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg  # noqa: E402
from flwr.supercore.differential_privacy import compute_stdv  # noqa: E402


def _states(m: int, seed: int, scale: float = 1.0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"prompt.0": (3, 2, 2, 8), "prompt.1": (3, 1, 2, 8)}
    glob = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    clients = []
    for i in range(m):
        # norms spread from well below to well above the clipping norm
        s = scale * (0.2 + i)
        clients.append({k: glob[k] + s * torch.randn(v.shape, generator=g) / 7.0 for k, v in glob.items()})
    return glob, clients


def _replies(clients: list[dict[str, torch.Tensor]]) -> list[Message]:
    """The clients' uploads as the SuperLink hands them to a ServerApp (node -> server, round 1, equal weights)."""
    replies = []
    for node, state in enumerate(clients):
        meta = Metadata(1, f"m{node}", node + 1, 0, "i0", "1", 0.0, 3600.0, "train")
        content = RecordDict(
            {"arrays": ArrayRecord.from_torch_state_dict(state), "metrics": MetricRecord({"num-examples": 10})}
        )
        replies.append(Message(content, metadata=meta))
    return replies


def _flower_round(
    glob: dict[str, torch.Tensor], clients: list[dict[str, torch.Tensor]], z: float, c: float
) -> dict[str, torch.Tensor]:
    """Flower 1.42's Message-API DP wrapper around FedAvg (equal example counts: a uniform mean)."""
    strategy = DifferentialPrivacyServerSideFixedClipping(FlowerFedAvg(), z, c, len(clients))
    strategy.current_arrays = ArrayRecord.from_torch_state_dict(glob)
    arrays, _ = strategy.aggregate_train(1, _replies(clients))
    assert arrays is not None
    return {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}


@pytest.mark.parametrize("clip", [0.05, 0.5, 100.0])
def test_clipping_equals_flower_server_side_fixed_clipping(clip: float) -> None:
    glob, clients = _states(4, seed=1)
    norms = [update_norm({k: s[k] - glob[k] for k in glob}) for s in clients]
    if clip == 0.5:
        assert min(norms) < clip < max(norms)  # some clipped, some not
    dp = ClientLevelDP(noise_multiplier=0.0, clipping_norm=clip, delta=1e-3)
    dp.plan(num_rounds=3, sample_rate=4 / 40, clients_per_round=4)
    ours = dp.private_mean(glob, clients, torch.Generator().manual_seed(0))
    theirs = _flower_round(glob, clients, z=0.0, c=clip)
    assert set(ours) == set(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=2e-6)  # float32 rounding only
    # and the clip itself: norm min(||d||, C), direction kept
    d = {k: clients[3][k] - glob[k] for k in glob}
    cl = dp.clip(d)
    assert update_norm(cl) == pytest.approx(min(update_norm(d), clip), rel=1e-6)
    cos = sum(float((cl[k] * d[k]).sum()) for k in d) / (update_norm(cl) * update_norm(d))
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_noise_std_equals_flower_compute_stdv_and_is_what_is_drawn() -> None:
    z, c, m = 1.3, 0.7, 5
    dp = ClientLevelDP(noise_multiplier=z, clipping_norm=c, delta=1e-4)
    dp.plan(num_rounds=2, sample_rate=m / 100, clients_per_round=m)
    assert dp.noise_std() == pytest.approx(compute_stdv(z, c, m), rel=1e-12)
    # identical small updates (Flower divides by a zero norm): mean minus that update is the noise
    glob = {"w": torch.zeros(200_000)}
    step = torch.zeros(200_000)
    step[0] = 1e-3
    clients = [{"w": step.clone()} for _ in range(m)]
    ours = dp.private_mean(glob, clients, torch.Generator().manual_seed(3))["w"] - step
    np.random.seed(3)
    theirs = _flower_round(glob, clients, z=z, c=c)["w"] - step
    expected = z * c / m
    # std of a sample std over n normal draws is about sigma / sqrt(2n): 0.16% here; allow 1%
    assert float(ours.std()) == pytest.approx(expected, rel=0.01)
    assert float(theirs.std()) == pytest.approx(expected, rel=0.01)
    assert float(ours.std()) == pytest.approx(float(theirs.std()), rel=0.02)
    assert abs(float(ours.mean())) < 5 * expected / math.sqrt(200_000)
    # an update of norm 0 is left as is (Flower's clip divides by the norm)
    zero = dp.clip({"w": torch.zeros(3)})
    assert torch.equal(zero["w"], torch.zeros(3))


def test_epsilon_equals_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    for z, q, rounds in [(1.1, 0.1, 50), (0.8, 0.01, 300), (2.0, 1.0, 5)]:
        dp = ClientLevelDP(noise_multiplier=z, clipping_norm=1.0, delta=1e-5)
        dp.plan(num_rounds=rounds, sample_rate=q, clients_per_round=max(1, round(q * 1000)))
        acc = RDPAccountant()
        acc.history = [(z, q, rounds)]
        assert dp.epsilon(rounds) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
        assert rdp_epsilon(z, q, rounds, 1e-5) == dp.epsilon(rounds)
    assert dp.epsilon(0) == 0.0


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_target_epsilon_is_reached_and_never_overspent(target: float) -> None:
    rounds, n, m = 20, 100, 10
    dp = ClientLevelDP(target_epsilon=target, clipping_norm=0.5, delta=1e-4)
    z = dp.plan(num_rounds=rounds, sample_rate=m / n, clients_per_round=m)
    assert z > 0 and dp.noise_multiplier == z
    glob, _ = _states(1, seed=0)
    g = torch.Generator().manual_seed(0)
    released = 0
    while dp.round_allowed(dp.rounds + 1):
        _, clients = _states(m, seed=released + 10)
        dp.private_mean(glob, clients, g)
        released += 1
        assert dp.epsilon() <= target
        assert released < 10 * rounds
    # the plan is used in full (the search tolerance is small) and the next round is refused
    assert released >= rounds
    assert dp.epsilon() == pytest.approx(target, rel=0.05)
    assert dp.epsilon(dp.rounds + 1) > target
    _, clients = _states(m, seed=99)
    with pytest.raises(PrivacyBudgetExhausted, match=r"target_epsilon"):
        dp.private_mean(glob, clients, g)
    assert dp.rounds == released  # the refused round released nothing


def test_adaptive_clipping_moves_c_towards_the_quantile() -> None:
    m, rounds = 40, 60
    norms = torch.linspace(0.5, 4.5, m)  # the unclipped median is about 2.5
    median = float(norms.median())
    for start in (0.05, 50.0):
        dp = ClientLevelDP(noise_multiplier=0.0, clipping_norm=start, adaptive=True, delta=1e-4)
        dp.plan(num_rounds=rounds, sample_rate=m / 400, clients_per_round=m)
        g = torch.Generator().manual_seed(0)
        glob = {"w": torch.zeros(4)}
        history = [dp.clipping_norm]
        for _ in range(rounds):
            clients = [{"w": torch.tensor([float(r), 0.0, 0.0, 0.0])} for r in norms]
            dp.private_mean(glob, clients, g)
            history.append(dp.clipping_norm)
        assert abs(math.log(history[-1] / median)) < 0.15, (start, history[-1])
        # monotone approach from either side until it reaches the median
        assert abs(math.log(history[10] / median)) < abs(math.log(start / median))


def test_adaptive_clipping_with_noise_splits_the_budget() -> None:
    m = 100
    dp = ClientLevelDP(noise_multiplier=1.0, clipping_norm=0.1, adaptive=True, delta=1e-5)
    dp.plan(num_rounds=10, sample_rate=0.1, clients_per_round=m)
    sigma_b = m / 20
    assert dp.count_stddev == sigma_b
    # Andrew et al. Thm 1: 1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2
    assert dp.update_noise_multiplier**-2 + (2 * sigma_b) ** -2 == pytest.approx(1.0)
    assert dp.noise_std() == pytest.approx(dp.update_noise_multiplier * 0.1 / m)
    too_small = ClientLevelDP(noise_multiplier=1.0, clipping_norm=0.1, adaptive=True, delta=1e-5)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        too_small.plan(num_rounds=10, sample_rate=0.1, clients_per_round=10)  # sigma_b = 0.5 <= z / 2
    needs_bits = ClientLevelDP(noise_multiplier=1.0, clipping_norm=0.1, adaptive=True, delta=1e-5)
    needs_bits.plan(num_rounds=10, sample_rate=0.1, clients_per_round=m)
    with pytest.raises(ValueError, match="unclipped"):
        needs_bits.aggregate([{"w": torch.zeros(2)}], torch.Generator())


def test_state_dict_round_trip_with_weights_only() -> None:
    dp = ClientLevelDP(target_epsilon=2.0, clipping_norm=0.3, adaptive=True, delta=1e-4)
    dp.plan(num_rounds=5, sample_rate=0.2, clients_per_round=40)
    glob, clients = _states(40, seed=4, scale=0.1)
    g = torch.Generator().manual_seed(1)
    dp.private_mean(glob, clients, g)
    dp.private_mean(glob, clients, g)
    buf = io.BytesIO()
    torch.save(dp.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = ClientLevelDP(target_epsilon=2.0, clipping_norm=0.3, adaptive=True, delta=1e-4)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == dp.state_dict()
    assert fresh.rounds == 2 and fresh.clipping_norm != 0.3
    assert fresh.epsilon() == dp.epsilon()
    # continuing from the restored state gives the same next release
    g2 = torch.Generator().manual_seed(7)
    a = dp.private_mean(glob, clients, torch.Generator().manual_seed(7))
    b = fresh.private_mean(glob, clients, g2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    other = ClientLevelDP(target_epsilon=4.0, clipping_norm=0.3, adaptive=True, delta=1e-4)
    with pytest.raises(ValueError, match="target_epsilon=2.0"):
        other.load_state_dict(state)
    replanned = ClientLevelDP(target_epsilon=2.0, clipping_norm=0.3, adaptive=True, delta=1e-4)
    replanned.plan(num_rounds=5, sample_rate=0.1, clients_per_round=40)
    with pytest.raises(ValueError, match="sample_rate=0.2"):
        replanned.load_state_dict(state)


def test_bad_settings_are_refused_with_the_argument_named() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ClientLevelDP(clipping_norm=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        ClientLevelDP(clipping_norm=1.0, noise_multiplier=1.0, target_epsilon=1.0)
    with pytest.raises(ValueError, match="clipping_norm"):
        ClientLevelDP(clipping_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        ClientLevelDP(clipping_norm=1.0, target_epsilon=math.inf)
    with pytest.raises(ValueError, match="target_unclipped_quantile"):
        ClientLevelDP(clipping_norm=1.0, noise_multiplier=1.0, target_unclipped_quantile=1.5)
    dp = ClientLevelDP(clipping_norm=1.0, noise_multiplier=1.0, delta=0.1)
    with pytest.raises(ValueError, match="delta"):
        dp.plan(num_rounds=3, sample_rate=0.5, clients_per_round=5)  # N = 10, delta >= 1/N
    with pytest.raises(RuntimeError, match="plan"):
        dp.aggregate([{"w": torch.zeros(2)}], torch.Generator())
    dp = ClientLevelDP(clipping_norm=1.0, noise_multiplier=1.0, delta=1e-3)
    dp.plan(num_rounds=3, sample_rate=0.1, clients_per_round=2)
    with pytest.raises(AggregationError, match="clients_per_round=2"):
        dp.aggregate([{"w": torch.zeros(2)}] * 3, torch.Generator())
    with pytest.raises(AggregationError, match="shape"):
        dp.aggregate([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], torch.Generator())
    unreachable = ClientLevelDP(clipping_norm=1.0, target_epsilon=1e-6, delta=1e-5)
    with pytest.raises(ValueError, match="cannot be met"):
        unreachable.plan(num_rounds=1000, sample_rate=1.0, clients_per_round=10)


def test_dropped_clients_keep_the_fixed_denominator() -> None:
    """A client that does not report contributes zero: the sum is still divided by the planned m."""
    dp = ClientLevelDP(noise_multiplier=0.0, clipping_norm=10.0, delta=1e-3)
    dp.plan(num_rounds=2, sample_rate=0.1, clients_per_round=4)
    out = dp.aggregate([{"w": torch.ones(3)}] * 3, torch.Generator())
    torch.testing.assert_close(out["w"], torch.full((3,), 0.75))


def test_built_from_a_yaml_config_by_class_path() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--client_dp", type=ClientLevelDP)
    cfg = parser.parse_string(
        "client_dp:\n  class_path: privtune.federated.client_dp.ClientLevelDP\n"
        "  init_args: {target_epsilon: 3.0, clipping_norm: 0.5, delta: 1.0e-4, adaptive: true}\n"
    )
    dp = parser.instantiate(cfg).client_dp
    assert isinstance(dp, ClientLevelDP)
    assert (dp.target_epsilon, dp.clipping_norm, dp.delta, dp.adaptive) == (3.0, 0.5, 1e-4, True)


def test_adaptive_clipping_follows_the_paper_where_flower_moves_the_other_way() -> None:
    """Every update is clipped: Andrew et al. raise C; Flower 1.42's wrapper counts clipped updates and lowers it."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    glob, clients = _states(4, seed=2, scale=10.0)
    start = 0.01
    assert all(update_norm({k: s[k] - glob[k] for k in glob}) > start for s in clients)
    dp = ClientLevelDP(noise_multiplier=0.0, clipping_norm=start, adaptive=True, delta=1e-3)
    dp.plan(num_rounds=1, sample_rate=0.1, clients_per_round=4)
    dp.private_mean(glob, clients, torch.Generator().manual_seed(0))
    assert dp.clipping_norm == pytest.approx(start * math.exp(0.2 * 0.5))  # b = 0 < gamma = 0.5: C grows
    flower = DifferentialPrivacyServerSideAdaptiveClipping(FlowerFedAvg(), 0.0, 4, initial_clipping_norm=start)
    flower.current_arrays = ArrayRecord.from_torch_state_dict(glob)
    flower.aggregate_train(1, _replies(clients))
    assert flower.clipping_norm == pytest.approx(start * math.exp(-0.2 * 0.5))  # Flower: C shrinks further
