"""FedPepTAO layer scoring and the SLQ Hessian-spectrum ratio."""

from __future__ import annotations

import pytest
import torch

from privtune.prompts import (
    aggregate_layer_scores,
    client_layer_scores,
    hessian_ratio,
    hessian_vector_product,
    lanczos,
    layer_score,
    mass_above,
    num_layers_from_ratio,
    rank_layers,
    select_layers,
    spectral_density,
)


def test_layer_score_matches_formula() -> None:
    h = torch.randn(4, 3, 5)
    flat = h.reshape(4, -1).double()
    flat = flat / flat.norm(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(flat @ flat.T).clamp_min(0)
    expected = float((torch.log(lam + 1e-5) + 1 / (lam + 1e-5)).sum())
    assert layer_score(h) == pytest.approx(expected, rel=1e-9)


def test_identical_representations_get_the_top_score_and_last_layer_is_zero() -> None:
    torch.manual_seed(0)
    hidden = [torch.randn(8, 4, 6) for _ in range(5)]  # embedding output + 4 layers
    hidden[2] = torch.randn(1, 4, 6).expand(8, 4, 6).clone()  # layer 1: identical samples
    scores = client_layer_scores(hidden)
    assert scores.shape == (4,)
    assert scores[3] == 0.0
    assert rank_layers(scores)[0] == 1  # hidden_states[l + 1] scores layer l


def test_batch_of_one_warns() -> None:
    with pytest.warns(UserWarning, match="batch of 1"):
        client_layer_scores([torch.randn(1, 3, 4) for _ in range(3)])


def test_aggregation_is_data_size_weighted() -> None:
    s = aggregate_layer_scores([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [3, 1])
    torch.testing.assert_close(s, torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert rank_layers(torch.tensor([0.5, 2.0, 2.0, -1.0])) == [1, 2, 0, 3]


def test_selecting_more_layers_than_the_model_has_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"num_selected_layers.*\[1, 4\]"):
        select_layers([0, 1, 2, 3], 5)
    assert select_layers([3, 1, 0, 2], 2) == [3, 1]
    assert num_layers_from_ratio(0.5, 30) == 15
    assert num_layers_from_ratio(0.0, 30) == 1


def test_hvp_matches_finite_differences() -> None:
    torch.manual_seed(0)
    a = torch.randn(6, 6)
    param = torch.randn(6, requires_grad=True)

    def loss() -> torch.Tensor:
        return torch.sin(param @ a @ param) + (param**4).sum()

    v = torch.randn(6)
    hv = hessian_vector_product(loss, param, v)
    eps = 1e-3

    def grad_at(x: torch.Tensor) -> torch.Tensor:
        p = x.clone().double().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.sin(p @ a.double() @ p) + (p**4).sum(), p)
        return g

    fd = (grad_at(param.detach() + eps * v) - grad_at(param.detach() - eps * v)) / (2 * eps)
    torch.testing.assert_close(hv.double(), fd, atol=1e-3, rtol=1e-3)


def test_slq_mass_above_threshold_on_a_known_diagonal_hessian() -> None:
    eig = torch.cat([torch.full((10,), -0.5), torch.linspace(0.05, 0.9, 15), torch.linspace(2.0, 5.0, 15)])
    param = torch.zeros(40, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        return 0.5 * (eig.double() * param**2).sum()

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return hessian_vector_product(loss, param, v.double())

    ritz, weights = lanczos(matvec, 40, num_iters=50, seed=0)
    grid, density = spectral_density(ritz, weights)
    for t in (0.0, 1.0, 3.0):
        true = float((eig > t).double().mean())
        assert mass_above(grid, density, t) == pytest.approx(true, abs=0.05)
    ratio = hessian_ratio(loss, param, num_iters=50)
    assert 0.0 <= ratio <= 1.0
