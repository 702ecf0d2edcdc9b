"""Step planning and the privacy budget without Lightning (privtune.dp): bounds, refusals, the cap's tightness."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from privtune.dp.planning import UnboundedRunError, plan_steps

LIMITS = [
    ({"max_epochs": 3, "max_steps": -1}, 5, 15),
    ({"max_epochs": 2, "max_steps": 100}, 5, 10),  # max_steps beyond what the epochs allow
    ({"max_epochs": 10, "max_steps": 7}, 5, 7),
    ({"max_epochs": -1, "max_steps": 7}, 5, 7),
    ({"max_epochs": None, "max_steps": -1, "steps": 40}, 5, 40),  # max_time only, with steps=
    ({"max_epochs": 2, "max_steps": -1, "steps": 40}, 5, 10),  # steps= beyond the trainer's limits
    ({"max_epochs": 3, "max_steps": -1, "accumulate_grad_batches": 2}, 5, 9),  # ceil(5 / 2) per epoch
]


IDS = ["max_epochs", "max_steps_beyond_epochs", "max_steps", "max_steps_only", "max_time_steps", "steps_beyond",
       "accumulate"]  # fmt: skip


@pytest.mark.parametrize(("limits", "batches", "expected"), LIMITS, ids=IDS)
def test_plan_takes_the_smallest_finite_bound(limits, batches, expected) -> None:
    assert plan_steps(batches, **limits) == expected


@pytest.mark.parametrize(
    "limits", [{"max_epochs": -1, "max_steps": -1}, {"max_epochs": None, "max_steps": None}], ids=["minus_one", "none"]
)
def test_unbounded_plan_is_refused(limits) -> None:
    with pytest.raises(UnboundedRunError, match=r"no finite number of steps.*`steps=`"):
        plan_steps(5, **limits)
    with pytest.raises(UnboundedRunError):
        plan_steps(math.inf, max_epochs=3, max_steps=-1)  # an unsized loader bounded by epochs only


def test_plan_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="`steps=0`"):
        plan_steps(5, max_epochs=1, max_steps=-1, steps=0)
    with pytest.raises(ValueError, match="`accumulate_grad_batches=0`"):
        plan_steps(5, max_epochs=1, max_steps=-1, accumulate_grad_batches=0)


def test_dp_core_imports_without_lightning(tmp_path) -> None:
    """Planning, the budget and the Poisson sampler work in a plain PyTorch project."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric'):\n"
        "            raise ImportError('lightning is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import privtune.dp, privtune.data.poisson\n"
        "print(privtune.dp.plan_steps(5, max_epochs=2, max_steps=-1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "10"


opacus = pytest.importorskip("opacus")

from privtune.dp.budget import epsilon_spent, noise_for, steps_within_budget  # noqa: E402


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_planned_noise_spends_the_target_within_the_planned_steps(accountant) -> None:
    sigma = noise_for(2.0, 1e-5, 0.1, 50, accountant)
    eps = epsilon_spent([(sigma, 0.1, 50)], 1e-5, accountant)
    assert 0.9 * 2.0 <= eps <= 2.0
    k = steps_within_budget(2.0, 1e-5, sigma, 0.1, accountant=accountant, hint=50)
    assert k >= 50
    assert (
        epsilon_spent([(sigma, 0.1, k)], 1e-5, accountant)
        <= 2.0
        < epsilon_spent([(sigma, 0.1, k + 1)], 1e-5, accountant)
    )


def test_rdp_figure_equals_opacus_accountant() -> None:
    from opacus.accountants import RDPAccountant

    history = [(1.1, 0.2, 7), (0.8, 0.05, 30)]
    acc = RDPAccountant()
    acc.history = list(history)
    assert epsilon_spent(history, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)


def test_budget_left_after_a_history_and_edge_cases() -> None:
    sigma = noise_for(3.0, 1e-5, 0.2, 20)
    total = steps_within_budget(3.0, 1e-5, sigma, 0.2, hint=20)
    assert steps_within_budget(3.0, 1e-5, sigma, 0.2, history=[(sigma, 0.2, 12)], hint=8) == total - 12
    assert steps_within_budget(3.0, 1e-5, sigma, 0.2, history=[(sigma, 0.2, 10_000)]) == 0  # already spent
    assert steps_within_budget(3.0, 1e-5, 0.0, 0.2) == 0  # no noise: no step fits a finite budget
    assert epsilon_spent([], 1e-5) == 0.0 and math.isinf(epsilon_spent([(0.0, 0.2, 1)], 1e-5))
    with pytest.raises(ValueError, match=r"`sample_rate=1\.5`"):
        noise_for(1.0, 1e-5, 1.5, 10)
