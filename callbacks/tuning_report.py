"""Report what tuning bought: the model evaluated before and after ``fit`` on the same split.

Reusable with any LightningModule that has an ``evaluate(dataloader, desc) -> dict[str, float]`` method
(e.g. :class:`privtune.modules.TextClassifier`). The "before" row is the zero-shot model; the report is
printed as a table and written as JSON and Markdown.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from privtune.contracts import EVALUATE_KEYS, ContractError


class TuningReport(pl.Callback):
    """Evaluate on the ``split`` dataloader at fit start (zero-shot) and fit end (tuned); report both.

    Args:
        split: which datamodule split to evaluate (``test`` or ``val``).
        output_dir: where ``tuning_report.json`` / ``.md`` go; defaults to the trainer's log dir (or
            ``default_root_dir``).
        title: first line of the table.

    Contract (:class:`privtune.contracts.Evaluator`): the module's ``evaluate(dataloader, desc=...)`` returns
    ``acc``, ``f1`` and ``n``; the datamodule has ``<split>_dataloader()``.

    Raises:
        ValueError: for a split other than ``test`` or ``val``.
        privtune.contracts.ContractError: in ``setup``, without ``evaluate()`` or the split's loader; at fit
            start, before any training step, when the zero-shot result lacks a key.
    """

    def __init__(self, split: Literal["test", "val"] = "test", output_dir: str | None = None, title: str = "") -> None:
        if split not in ("test", "val"):
            raise ValueError(f"`split={split!r}` must be 'test' or 'val'.")
        self.split = split
        self.output_dir = output_dir
        self.title = title
        self.rows: dict[str, dict[str, float]] = {}
        self._fit_start = 0.0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(split=self.split)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "evaluate", None)):
            raise ContractError(
                f"TuningReport: {type(pl_module).__name__} has no `evaluate(dataloader, desc)` method (Evaluator in "
                f"privtune.contracts) returning {list(EVALUATE_KEYS)}. HINT: use privtune.modules.TextClassifier or "
                "add that method (README, 'Callbacks')."
            )
        datamodule = trainer.datamodule
        if datamodule is None or not is_overridden(f"{self.split}_dataloader", datamodule):
            raise ContractError(
                f"TuningReport: `split={self.split!r}` evaluates on `trainer.datamodule.{self.split}_dataloader()`, "
                f"but {'the fit has no datamodule' if datamodule is None else 'its datamodule has none'}. "
                "HINT: pass a datamodule with that loader to `trainer.fit(..., datamodule=...)` or change `split`."
            )

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        loader = getattr(trainer.datamodule, f"{self.split}_dataloader")()
        row = pl_module.evaluate(loader, desc=f"{name} ({self.split})")
        missing = [k for k in EVALUATE_KEYS if not isinstance(row, Mapping) or k not in row]
        if missing:
            raise ContractError(
                f"TuningReport: {type(pl_module).__name__}.evaluate() returned {type(row).__name__} without {missing}; "
                f"the report needs {list(EVALUATE_KEYS)} (Evaluator in privtune.contracts)."
            )
        self.rows[name] = dict(row)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "zero-shot" not in self.rows:  # a resumed run keeps the zero-shot row of its first start
            self._evaluate(trainer, pl_module, "zero-shot")  # checks the keys before any training step
        self._fit_start = time.perf_counter()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train_seconds = time.perf_counter() - self._fit_start
        self._evaluate(trainer, pl_module, "tuned")
        self.rows["tuned"]["train_seconds"] = round(train_seconds, 1)
        self.rows["tuned"]["steps"] = trainer.global_step
        if trainer.is_global_zero:
            self._write(trainer)

    def markdown(self) -> str:
        """The report as a Markdown table."""
        lines = [f"| setting | {self.split} acc | macro-F1 | n |", "|---|---|---|---|"]
        for name, row in self.rows.items():
            lines.append(f"| {name} | {100 * row['acc']:.1f}% | {row['f1']:.3f} | {row['n']} |")
        if {"zero-shot", "tuned"} <= self.rows.keys():
            gain = 100 * (self.rows["tuned"]["acc"] - self.rows["zero-shot"]["acc"])
            lines.append(f"\nTuning gain: {gain:+.1f} accuracy points ({self.rows['tuned']['steps']} steps).")
        return "\n".join(lines)

    def _write(self, trainer: pl.Trainer) -> None:
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tuning_report.json").write_text(json.dumps({"split": self.split, "rows": self.rows}, indent=2))
        text = (f"{self.title}\n\n" if self.title else "") + self.markdown()
        (out / "tuning_report.md").write_text(text + "\n")
        rank_zero_info(f"\n{text}\nReport written to {out}/tuning_report.md")

    @override
    def state_dict(self) -> dict[str, object]:
        return {"rows": self.rows}

    @override
    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        self.rows = dict(state_dict.get("rows", {}))  # type: ignore[arg-type]
