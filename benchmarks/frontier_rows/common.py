"""What every row family shares: the clock, the callback lookup, the tuned bytes, and the row file's shared fields.

A runner returns its family's fields; :func:`write_row` adds the row's names, seed, machine (cores, torch threads,
load average) and provenance (:func:`privtune.eval.provenance.run_provenance`) and writes
``<out>/rows/<row>_seed<seed>.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privtune.eval.frontier import Row, row_file
from privtune.eval.provenance import run_provenance

ROOT = Path(__file__).resolve().parents[2]

Runner = Callable[[Row, int, Path, list[str], dict[str, Any] | None], dict[str, Any]]
"""``(row, seed, run_dir, sets, controls) -> the row file's family-specific fields`` (accuracy, best_attack,
validity, membership, dp, steps, bytes, times, overrides, regime; ``also``: other rows the same run yields)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def callback(trainer: Any, name: str) -> Any:  # noqa: ANN401 - a Lightning callback
    return next((cb for cb in trainer.callbacks if type(cb).__name__ == name), None)


class Clock:
    """Wall and CPU seconds since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return round(time.perf_counter() - self.wall, 1), round(time.process_time() - self.cpu, 1)


def tuned_size(cli: Any, steps: int) -> dict[str, int]:  # noqa: ANN401
    """Bytes and count of the trainable parameters (zero when no step ran)."""
    params = [p for p in cli.model.parameters() if p.requires_grad]
    tuned = sum(p.numel() * p.element_size() for p in params) if steps else 0
    return {"bytes": tuned, "parameters": sum(p.numel() for p in params) if steps else 0}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def write_row(row: Row, seed: int, out: Path, fields: dict[str, Any], load_start: float) -> Path:
    """The row file: the runner's fields with the shared ones (names, seed, machine, provenance)."""
    path = row_file(out, row.name, seed)
    result = {
        "row": row.name,
        "label": row.label,
        "family": row.family,
        "seed": seed,
        "config": row.config,
        **fields,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch_threads(),
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
        },
        "provenance": run_provenance(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    best = result["best_attack"]
    attack = f"best valid AUC {best['auc']['value']:.3f} ({best['attack']})" if best else "no valid attack"
    log(
        f"{row.name} seed {seed}: acc {result['accuracy']['acc']:.3f}, {attack}, "
        f"{result['wall_seconds']:.0f} s wall -> {path}"
    )
    return path
