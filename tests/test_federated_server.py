"""Server optimizers against their formulas, in float64 references computed independently."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from privtune.federated import (
    DELTA_C,
    AggregationError,
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedPepTAOOptions,
    FedPepTAOServer,
    FedYogi,
    Scaffold,
    client_control_variate,
    weighted_average,
)


def _updates(round_idx: int, n: int = 3, shape: tuple[int, ...] = (2, 3)) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(100 + round_idx)
    return [
        ClientUpdate(
            client_id=i * 2,
            state={"p": torch.randn(shape, generator=g)},
            num_examples=[5, 1, 3][i],
            num_steps=[4, 2, 7][i],
        )
        for i in range(n)
    ]


def test_weighted_average_by_example_count() -> None:
    a, b = {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 6.0])}
    torch.testing.assert_close(weighted_average([a, b], [1, 3])["x"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(weighted_average([a, b], [2, 2])["x"], torch.tensor([2.0, 4.0]))


def test_aggregation_errors_name_the_problem() -> None:
    a = {"x": torch.zeros(2)}
    with pytest.raises(AggregationError, match=r"client update 1 .*missing \['x'\].*unexpected \['y'\]"):
        weighted_average([a, {"y": torch.zeros(2)}], [1, 1])
    with pytest.raises(AggregationError, match=r"client update 1: tensor 'x' has shape \(3,\)"):
        weighted_average([a, {"x": torch.zeros(3)}], [1, 1])
    with pytest.raises(AggregationError, match="zero client updates"):
        FedAvg().step(a, [])
    with pytest.raises(AggregationError, match="positive sum"):
        weighted_average([a, a], [0, 0])


def _mean64(ups: list[ClientUpdate]) -> torch.Tensor:
    n = torch.tensor([float(u.num_examples) for u in ups], dtype=torch.float64)
    return sum(ni * u.state["p"].double() for ni, u in zip(n / n.sum(), ups))


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_family_matches_flower_formulas(name: str) -> None:
    opt = {
        "fedavgm": FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
        "fedadam": FedAdam(),
        "fedyogi": FedYogi(),
        "fedadagrad": FedAdagrad(),
    }[name]
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).double()
    m = v = torch.zeros_like(w)
    mom = None
    state = {"p": w.float()}
    for t in (1, 2, 3):
        ups = _updates(t)
        state = opt.step(state, ups)
        wbar = _mean64(ups)
        if name == "fedavgm":
            pg = w - wbar
            mom = pg if mom is None else 0.9 * mom + pg
            w = w - 0.7 * mom
        else:
            d = wbar - w
            b1 = {"fedadam": 0.9, "fedyogi": 0.9, "fedadagrad": 0.0}[name]
            m = b1 * m + (1 - b1) * d
            if name == "fedadam":
                v = 0.99 * v + 0.01 * d * d
                eta = 0.1 * math.sqrt(1 - 0.99 ** (t + 1)) / (1 - 0.9 ** (t + 1))
            elif name == "fedyogi":
                v = v - 0.01 * d * d * torch.sign(v - d * d)
                eta = 0.01
            else:
                v = v + d * d
                eta = 0.1
            w = w + eta * m / (v.sqrt() + 1e-3)
        torch.testing.assert_close(state["p"].double(), w, atol=1e-6, rtol=1e-5)


def test_hand_computed_fedadam_first_round() -> None:
    # one client, w = 0 -> w_bar = 1: m = 0.1, v = 0.01, eta_1 = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2)
    out = FedAdam().step({"p": torch.zeros(1)}, [ClientUpdate(0, {"p": torch.ones(1)}, 1)])
    eta = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.81)
    assert float(out["p"]) == pytest.approx(eta * 0.1 / (0.1 + 1e-3), rel=1e-6)


def test_flower_default_fedavgm_is_fedavg() -> None:
    ups = _updates(1)
    a = FedAvgM().step({"p": torch.zeros(2, 3)}, ups)["p"]
    b = FedAvg().step({"p": torch.zeros(2, 3)}, ups)["p"]
    torch.testing.assert_close(a, b)


def test_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="server_momentum"):
        FedAvgM(server_momentum=1.0)
    with pytest.raises(ValueError, match="tau"):
        FedAdam(tau=0.0)
    with pytest.raises(ValueError, match="server_grad"):
        FedPepTAOOptions(server_grad="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preset"):
        FedPepTAOOptions.preset("fast")


# --- FedPepTAO ------------------------------------------------------------------------------------------------
def _reference_fedpeptao(rounds: list[list[ClientUpdate]], w0: torch.Tensor, n_clients: int, grad: str, mode: str):
    w = w0.double()
    m = torch.zeros_like(w)
    c = torch.zeros_like(w)
    ci: dict[int, torch.Tensor] = {}
    dprev = None
    eta = 0.05
    closed = []
    for t, ups in enumerate(rounds, start=1):
        n = torch.tensor([float(u.num_examples) for u in ups], dtype=torch.float64)
        p = n / n.sum()
        wbar = sum(pi * u.state["p"].double() for pi, u in zip(p, ups))
        d = w - wbar
        cplus = {}
        for u in ups:
            old = ci.get(u.client_id, torch.zeros_like(w))
            cplus[u.client_id] = old - c + (w - u.state["p"].double()) / (u.num_steps * 0.04)
        ks = torch.tensor([float(u.num_steps) for u in ups], dtype=torch.float64)
        dc = sum(k * (cplus[u.client_id] - ci.get(u.client_id, torch.zeros_like(w))) for k, u in zip(ks, ups))
        c = c + (len(ups) / n_clients) * dc / ks.sum()
        if t == 1:
            dprev = d
            w = wbar
            ci.update(cplus)
            continue
        g = dprev - d if grad == "delta_diff" else d
        dprev = d
        eta = max(0.99 * eta, 1e-4)
        if mode == "round_start":
            mis = [0.9 * m + 0.1 * g + (c - cplus[u.client_id]) for u in ups]
            closed_w = wbar - eta * (0.9 * m + 0.1 * g + c - sum(pi * cplus[u.client_id] for pi, u in zip(p, ups)))
            w = sum(pi * (wbar - eta * mi) for pi, mi in zip(p, mis))
            m = sum(pi * mi for pi, mi in zip(p, mis))
            closed.append((w.clone(), closed_w))
        else:
            mu = m
            acc = torch.zeros_like(w)
            for pi, u in zip(p, ups):
                mu = 0.9 * mu + 0.1 * g + (c - cplus[u.client_id])
                acc = acc + pi * (wbar - eta * mu)
            w, m = acc, mu
        ci.update(cplus)
    return w, closed


@pytest.mark.parametrize("grad", ["delta_diff", "delta"])
@pytest.mark.parametrize("mode", ["chained", "round_start"])
def test_fedpeptao_matches_float64_reference(grad: str, mode: str) -> None:
    w0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    rounds = [_updates(t) for t in (1, 2, 3)]
    server = FedPepTAOServer(num_clients=10, options=FedPepTAOOptions(server_grad=grad, momentum_mode=mode))
    state = {"p": w0.clone()}
    for ups in rounds:
        state = server.step(state, ups)
    ref, closed = _reference_fedpeptao(rounds, w0, 10, grad, mode)
    torch.testing.assert_close(state["p"].double(), ref, atol=1e-6, rtol=1e-6)
    for w, cw in closed:  # round_start equals its closed form
        torch.testing.assert_close(w, cw, atol=1e-9, rtol=1e-9)
    assert server.eta_s == pytest.approx(0.05 * 0.99**2)


def test_fedpeptao_reductions() -> None:
    w0 = {"p": torch.zeros(2, 3)}
    rounds = [_updates(t) for t in (1, 2, 3)]
    # eta_s = 0 (and a floor of 0) is FedAvg exactly
    server = FedPepTAOServer(num_clients=10, options=FedPepTAOOptions(server_lr=0.0, server_lr_min=0.0))
    state = dict(w0)
    for ups in rounds:
        state = server.step(state, ups)
        torch.testing.assert_close(
            state["p"], weighted_average([u.state for u in ups], [u.num_examples for u in ups])["p"]
        )
    # skipping round 1 leaves w = w_bar; equal n_i give the plain mean
    ups = [ClientUpdate(i, {"p": torch.full((2,), float(i))}, 4, 3) for i in range(3)]
    out = FedPepTAOServer(num_clients=3).step({"p": torch.zeros(2)}, ups)
    torch.testing.assert_close(out["p"], torch.ones(2))


def _fedpeptao_correction(num_steps: int, cohort: int, mode: str = "chained") -> float:
    """The round-3 ``server/correction_over_fedavg`` of clients that all move the prompt by +0.01 a round."""
    server = FedPepTAOServer(num_clients=100, options=FedPepTAOOptions(momentum_mode=mode))  # type: ignore[arg-type]
    state = {"p": torch.zeros(4)}
    for _ in range(3):
        ups = [ClientUpdate(i, {"p": state["p"] + 0.01}, 10, num_steps) for i in range(cohort)]
        state = server.step(state, ups)
    return server.diagnostics["server/correction_over_fedavg"]


def test_fedpeptao_diagnostics_show_the_correction_growing_with_cohort_and_few_local_steps() -> None:
    # the control-variate term (w - w_i) / (K_i eta_l) scales as 1 / K_i and, chained, is added once per client
    few, many = _fedpeptao_correction(num_steps=4, cohort=10), _fedpeptao_correction(num_steps=64, cohort=10)
    assert few > 1.0 > many
    assert _fedpeptao_correction(num_steps=4, cohort=10) > 2 * _fedpeptao_correction(num_steps=4, cohort=2)
    assert _fedpeptao_correction(4, 10, "round_start") < few / 3
    # the cosine of the server's step with FedAvg's is logged beside it; eta_s = 0 is FedAvg: no correction
    server = FedPepTAOServer(num_clients=10, options=FedPepTAOOptions(server_lr=0.0, server_lr_min=0.0))
    state = {"p": torch.zeros(2, 3)}
    for t in (1, 2):
        state = server.step(state, _updates(t))
    assert server.diagnostics["server/correction_over_fedavg"] == pytest.approx(0.0, abs=1e-6)
    assert server.diagnostics["server/cos_step_fedavg"] == pytest.approx(1.0, abs=1e-5)


def _run_rounds(server: FedPepTAOServer, num_steps: int, rounds: int = 8) -> None:
    """Cohorts of 10 clients that each move the prompt by about +0.01 (with a little noise) per round."""
    state, g = {"p": torch.zeros(4)}, torch.Generator().manual_seed(0)
    for _ in range(rounds):
        moved = [state["p"] + 0.01 + 0.01 * torch.randn(4, generator=g) for _ in range(10)]
        state = server.step(state, [ClientUpdate(i, {"p": p}, 10, num_steps) for i, p in enumerate(moved)])


def test_fedpeptao_warns_once_when_its_correction_turns_against_the_clients() -> None:
    # few local steps, a cohort of 10 chained: the server's step opposes FedAvg's within a few rounds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_rounds(FedPepTAOServer(num_clients=100), num_steps=3)
    drift = [w for w in caught if "FedPepTAOServer" in str(w.message)]
    assert len(drift) == 1 and issubclass(drift[0].category, RuntimeWarning)
    assert "round_start" in str(drift[0].message) and "local steps" in str(drift[0].message)
    # already round-start: the hint names what is left (more local steps, the control-variate scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server = FedPepTAOServer(num_clients=100, options=FedPepTAOOptions(momentum_mode="round_start"))
        _run_rounds(server, num_steps=1, rounds=12)
    drift = [str(w.message) for w in caught if "FedPepTAOServer" in str(w.message)]
    assert len(drift) == 1 and "momentum_mode: round_start" not in drift[0] and "cv_local_lr" in drift[0]
    # many local steps, the correction taken once per round: below FedAvg's step, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run_rounds(FedPepTAOServer(num_clients=100, options=FedPepTAOOptions(momentum_mode="round_start")), 200)


def test_fedpeptao_state_roundtrip() -> None:
    a = FedPepTAOServer(num_clients=10)
    state = {"p": torch.zeros(2, 3)}
    for t in (1, 2):
        state = a.step(state, _updates(t))
    b = FedPepTAOServer(num_clients=10)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.step(state, _updates(3))["p"], b.step(state, _updates(3))["p"])


# --- SCAFFOLD ---------------------------------------------------------------------------------------------------
def test_scaffold_matches_paper_on_quadratic_toy() -> None:
    """Two clients with f_i(y) = 0.5 ||y - a_i||^2, K local SGD steps with the correction, option II."""
    a = [torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 0.5])]
    eta_l, k, n = 0.1, 3, 2
    server = Scaffold(num_clients=n, eta_l=eta_l)
    x = {"p": torch.zeros(2)}
    ci = [{"p": torch.zeros(2)} for _ in range(n)]
    ref_x, ref_c, ref_ci = (
        torch.zeros(2, dtype=torch.float64),
        torch.zeros(2, dtype=torch.float64),
        [torch.zeros(2, dtype=torch.float64) for _ in range(n)],
    )
    for _ in range(3):
        c = server.control_variate(x)
        ups = []
        for i in range(n):
            y = x["p"].clone()
            for _ in range(k):
                y = y - eta_l * ((y - a[i]) - ci[i]["p"] + c["p"])
            new_ci = client_control_variate(ci[i], c, x, {"p": y}, k, eta_l)
            ups.append(ClientUpdate(i, {"p": y}, 1, k, extras={DELTA_C + "p": new_ci["p"] - ci[i]["p"]}))
            ci[i] = new_ci
        x = server.step(x, ups)
        # float64 reference of the paper's update
        ys, dcs = [], []
        for i in range(n):
            y = ref_x.clone()
            for _ in range(k):
                y = y - eta_l * ((y - a[i].double()) - ref_ci[i] + ref_c)
            new = ref_ci[i] - ref_c + (ref_x - y) / (k * eta_l)
            dcs.append(new - ref_ci[i])
            ref_ci[i] = new
            ys.append(y)
        ref_x = ref_x + sum(y - ref_x for y in ys) / n
        ref_c = ref_c + (n / n) * sum(dcs) / n
        torch.testing.assert_close(x["p"].double(), ref_x, atol=1e-5, rtol=1e-5)
    assert server.bytes_factor == 2


def test_fedpeptao_adaptive_names_leave_other_tensors_at_fedavg() -> None:
    server = FedPepTAOServer(num_clients=10, adaptive_names=["p"])
    plain = FedPepTAOServer(num_clients=10)
    state = {"p": torch.zeros(2, 3), "head": torch.zeros(2, 3)}
    ref = {"p": torch.zeros(2, 3)}
    for t in (1, 2, 3):
        ups = _updates(t)
        both = [
            ClientUpdate(u.client_id, {"p": u.state["p"], "head": u.state["p"] * 2}, u.num_examples, u.num_steps)
            for u in ups
        ]
        state = server.step(state, both)
        ref = plain.step(ref, ups)
        avg = weighted_average([u.state for u in both], [u.num_examples for u in both])
        torch.testing.assert_close(state["head"], avg["head"])
        torch.testing.assert_close(state["p"], ref["p"])
