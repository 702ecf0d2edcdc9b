"""Every YAML under configs/ parses and type-checks against its classes, without loading any model.

LightningCLI always instantiates what it parses, even with ``run=False``; a test-local subclass whose
``instantiate_classes`` does nothing leaves ``cli.config`` parsed and checked and nothing built.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

import privtune.callbacks  # noqa: F401
import privtune.datamodules  # noqa: F401
import privtune.modules  # noqa: F401

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))


class _ParseOnlyCLI(LightningCLI):
    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_parses(path: Path) -> None:
    head = path.read_text().splitlines()[:3]
    assert head[0].startswith("# ") and len(head[0]) > 10, "a config opens with a one-line purpose comment"
    assert any("python train.py" in line or "Run:" in line for line in head), "and says how to run it"
    cli = _ParseOnlyCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(path)])
    assert cli.config.model.class_path and cli.config.data.class_path


def test_default_config_exists() -> None:
    assert any(p.name == "default.yaml" and p.parent.name == "configs" for p in CONFIGS)
