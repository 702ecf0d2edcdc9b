"""Differential privacy bookkeeping without Lightning: step planning and the privacy budget (Opacus accountants)."""

from privtune.dp.budget import Accountant, History, epsilon_spent, noise_for, require_opacus, steps_within_budget
from privtune.dp.planning import UnboundedRunError, plan_steps

__all__ = [
    "Accountant",
    "History",
    "UnboundedRunError",
    "epsilon_spent",
    "noise_for",
    "plan_steps",
    "require_opacus",
    "steps_within_budget",
]
