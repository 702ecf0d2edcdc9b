"""FedProx and SCAFFOLD callbacks: the gradient terms they add, one implementation shared with the round loop,
re-anchoring per fit, and the mistakes they refuse."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privtune.callbacks.fedprox import FedProx
from privtune.callbacks.scaffold import ScaffoldCorrection
from privtune.federated import ClientState, CommunicatedView, LocalConfig, local_round


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.prompt = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.other = torch.nn.Parameter(torch.tensor([5.0]))


class _Quadratic(pl.LightningModule):
    """A toy client: loss ``||prompt - x||^2`` per batch; a FederatedClient and a LightningModule at once."""

    def __init__(self, start: list[float]) -> None:
        super().__init__()
        self.prompt = torch.nn.Parameter(torch.tensor(start))

    def client_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {"prompt": self.prompt}

    def client_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        return ((self.prompt - batch[0]) ** 2).sum(-1).mean()

    def evaluate_batch(self, batch: list[torch.Tensor]) -> tuple[int, int]:
        return 0, len(batch[0])

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.client_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 3.0], [-2.0, 0.5], [0.5, 0.5], [4.0, 1.0]])
    return DataLoader(TensorDataset(x), batch_size=2)


def _fit(module: pl.LightningModule, callback: pl.Callback, tmp: Path, steps: int = 3) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
        default_root_dir=str(tmp),
    )
    trainer.fit(module, train_dataloaders=_loader())


def test_fedprox_adds_mu_times_distance_to_global() -> None:
    module, cb = _Module(), FedProx(mu=0.5)
    cb.on_train_start(None, module)  # type: ignore[arg-type]
    with torch.no_grad():
        module.prompt += torch.tensor([2.0, -2.0])
    module.prompt.grad = torch.zeros(2)
    module.other.grad = torch.zeros(1)
    cb.on_after_backward(None, module)  # type: ignore[arg-type]
    torch.testing.assert_close(module.prompt.grad, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(module.other.grad, torch.zeros(1))  # not federated, untouched
    restored = FedProx(mu=0.5)
    restored.load_state_dict(cb.state_dict())
    restored.on_train_start(None, module)  # type: ignore[arg-type]  # a resumed fit keeps the saved anchor
    torch.testing.assert_close(restored.global_state["prompt"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="mu"):
        FedProx(mu=-0.1)
    with pytest.raises(ValueError, match="param_prefix='nothing'"):
        FedProx(param_prefix="nothing").on_train_start(None, module)  # type: ignore[arg-type]
    wrong = FedProx(mu=0.5)
    wrong.set_global({"other": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"global state names \['other'\]"):
        wrong.on_train_start(None, module)  # type: ignore[arg-type]


def test_fedprox_reanchors_at_every_fit_start(tmp_path: Path) -> None:
    module, cb = _Quadratic([3.0, -3.0]), FedProx(mu=0.1)
    _fit(module, cb, tmp_path)
    torch.testing.assert_close(cb.global_state["prompt"], torch.tensor([3.0, -3.0]))
    after_first = module.prompt.detach().clone()
    assert not torch.equal(after_first, torch.tensor([3.0, -3.0]))
    _fit(module, cb, tmp_path)  # second fit: the anchor is where this fit starts, not the first fit's start
    torch.testing.assert_close(cb.global_state["prompt"], after_first)
    cb.set_global({"prompt": torch.tensor([7.0, 7.0])})  # a new global value for the next fit only
    _fit(module, cb, tmp_path)
    torch.testing.assert_close(cb.global_state["prompt"], torch.tensor([7.0, 7.0]))
    after_third = module.prompt.detach().clone()
    _fit(module, cb, tmp_path)
    torch.testing.assert_close(cb.global_state["prompt"], after_third)


def test_fedprox_callback_equals_the_round_loop_term(tmp_path: Path) -> None:
    # one implementation: a Lightning fit with the callback and the loop's local round take the same SGD steps
    start, mu = [3.0, -3.0], 0.7
    lightning_client = _Quadratic(start)
    _fit(lightning_client, FedProx(mu=mu), tmp_path)
    loop_client = _Quadratic(start)
    config = LocalConfig(optimizer="sgd", lr=0.1, clip_norm=0.0)
    state = ClientState(prompt=None)
    anchor = {"prompt": torch.tensor(start)}
    result = local_round(loop_client, CommunicatedView(), anchor, state, _loader(), config, seed=0, proximal_mu=mu)
    assert result.num_steps == 3
    torch.testing.assert_close(result.upload["prompt"], lightning_client.prompt.detach(), rtol=0, atol=0)
    without = local_round(
        _Quadratic(start), CommunicatedView(), {"prompt": torch.tensor(start)}, state, _loader(), config, seed=0
    )
    assert not torch.equal(without.upload["prompt"], result.upload["prompt"])  # the term did act


def test_scaffold_correction_and_option_ii_variate() -> None:
    module, cb = _Module(), ScaffoldCorrection(eta_l=0.1)
    cb.set_control_variates({"prompt": torch.tensor([1.0, 1.0])}, {"prompt": torch.tensor([0.5, 0.0])})
    cb.on_train_start(None, module)  # type: ignore[arg-type]
    module.prompt.grad = torch.zeros(2)
    cb.on_before_optimizer_step(None, module, None)  # type: ignore[arg-type]
    torch.testing.assert_close(module.prompt.grad, torch.tensor([0.5, 1.0]))
    with torch.no_grad():
        module.prompt -= torch.tensor([0.1, 0.2])
    c_plus = cb.new_control_variate(module)["prompt"]
    # c_i - c + (x - y) / (K eta_l) with K = 1
    torch.testing.assert_close(c_plus, torch.tensor([0.5, 0.0]) - 1.0 + torch.tensor([0.1, 0.2]) / 0.1)
    with pytest.raises(ValueError, match="eta_l"):
        ScaffoldCorrection(eta_l=0.0)


def test_scaffold_refuses_a_prefix_or_variates_that_match_nothing() -> None:
    module = _Module()
    with pytest.raises(ValueError, match=r"param_prefix='prefix'.*no gradient would be corrected"):
        ScaffoldCorrection(param_prefix="prefix").on_train_start(None, module)  # type: ignore[arg-type]
    cb = ScaffoldCorrection()
    cb.set_control_variates({"prefix": torch.zeros(2)}, {"prefix": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"control variates name \['prefix'\]"):
        cb.on_train_start(None, module)  # type: ignore[arg-type]


def test_scaffold_callback_equals_the_round_loop_correction(tmp_path: Path) -> None:
    start, c, c_i = [3.0, -3.0], torch.tensor([0.4, -0.2]), torch.tensor([-0.1, 0.3])
    lightning_client, cb = _Quadratic(start), ScaffoldCorrection(eta_l=0.1)
    cb.set_control_variates({"prompt": c}, {"prompt": c_i})
    _fit(lightning_client, cb, tmp_path)
    loop_client = _Quadratic(start)
    config = LocalConfig(optimizer="sgd", lr=0.1, clip_norm=0.0)
    state = ClientState(prompt=None, control_variate={"prompt": c_i})
    result = local_round(
        loop_client,
        CommunicatedView(),
        {"prompt": torch.tensor(start)},
        state,
        _loader(),
        config,
        seed=0,
        control_variate={"prompt": c},
        eta_l=0.1,
    )
    torch.testing.assert_close(result.upload["prompt"], lightning_client.prompt.detach(), rtol=0, atol=0)
    assert cb.steps == result.num_steps == 3
    torch.testing.assert_close(
        result.state.control_variate["prompt"], cb.new_control_variate(lightning_client)["prompt"], rtol=0, atol=0
    )
    torch.testing.assert_close(result.extras["delta_c/prompt"], result.state.control_variate["prompt"] - c_i)
