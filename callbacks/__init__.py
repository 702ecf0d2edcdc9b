"""Lightning callbacks: each privacy mechanism as a thin adapter over a core function.

Installed as ``privtune.callbacks``.
"""

from privtune.callbacks.tuning_report import TuningReport

__all__ = ["TuningReport"]
