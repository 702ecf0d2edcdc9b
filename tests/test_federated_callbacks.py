"""FedProx and SCAFFOLD callbacks: the gradient terms they add, state round trip, bad input."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from privtune.callbacks.fedprox import FedProx
from privtune.callbacks.scaffold import ScaffoldCorrection


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.prompt = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.other = torch.nn.Parameter(torch.tensor([5.0]))


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
    torch.testing.assert_close(restored.global_state["prompt"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="mu"):
        FedProx(mu=-0.1)
    with pytest.raises(ValueError, match="param_prefix"):
        FedProx(param_prefix="nothing").on_train_start(None, module)  # type: ignore[arg-type]


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
