"""The privacy frontier's row runners, one module per row family, behind ``benchmarks/privacy_frontier.py``.

``RUNNERS`` maps each :class:`privtune.eval.frontier.Row` family to its runner (:data:`common.Runner`): the central
rows (:mod:`.central`), the shaking rows (:mod:`.shaking`), the federated rows (:mod:`.federated`) and the offsite
rows (:mod:`.offsite`). Benchmarks are scripts, not an installed package: the script puts the repository root
(``privtune``, ``train``) and ``benchmarks/`` on ``sys.path`` before importing this.
"""

from __future__ import annotations

from .central import run_central
from .common import Runner
from .federated import run_federated
from .offsite import run_offsite
from .shaking import ensure_implanted, implant_config, run_shaking

RUNNERS: dict[str, Runner] = {
    "baseline": run_central,
    "dp_sgd": run_central,
    "shaking": run_shaking,
    "federated": run_federated,
    "offsite": run_offsite,
}

__all__ = [
    "RUNNERS",
    "Runner",
    "ensure_implanted",
    "implant_config",
    "run_central",
    "run_federated",
    "run_offsite",
    "run_shaking",
]
