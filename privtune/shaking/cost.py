"""A wall-clock ledger per CypherTalk phase, with ratios to plain tuning and plain inference.

CypherTalk (arXiv 2403.07283) reports cost as time per phase (preprocessing, private tuning, private
inference); privtune's decomposition (spec §5, a reconstruction) is ``keygen``, ``implant`` (shaking +
recovery training, the paper's "preprocessing"), ``private_tuning``, ``private_inference`` and
``weight_recovery``, each timed against ``plain_tuning`` and ``plain_inference`` of the same model.
Measure ratios in one process: this project's shared CPUs vary by up to 2x between runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PHASES = ("keygen", "implant", "private_tuning", "private_inference", "weight_recovery")
REFERENCES = {"private_tuning": "plain_tuning", "private_inference": "plain_inference"}


class CostLedger:
    """Accumulates seconds per named phase.

    Example::

        ledger = CostLedger()
        with ledger.phase("keygen"):
            key = ShakeKey.generate(setting, table)
        ledger.ratios()  # {"private_tuning": 1.02, ...} once the plain references are timed
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` body and add it to ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        """Add ``seconds`` (over ``count`` events, e.g. steps or requests) to phase ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)
        self.counts[name] = self.counts.get(name, 0) + int(count)

    def ratios(self) -> dict[str, float]:
        """Private phase time over its plain reference, for the pairs timed so far."""
        return {
            phase: self.seconds[phase] / self.seconds[ref]
            for phase, ref in REFERENCES.items()
            if phase in self.seconds and self.seconds.get(ref, 0) > 0
        }

    def to_dict(self) -> dict:
        """Seconds, counts and ratios."""
        return {"seconds": dict(self.seconds), "counts": dict(self.counts), "ratios": self.ratios()}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def markdown(self) -> str:
        """A two-column Markdown table of seconds per phase."""
        rows = ["| phase | seconds | events |", "|---|---|---|"]
        rows += [f"| {name} | {sec:.2f} | {self.counts[name]} |" for name, sec in self.seconds.items()]
        rows += [f"| {name} / {REFERENCES[name]} | {r:.3f}x | |" for name, r in self.ratios().items()]
        return "\n".join(rows)
