"""Every configs/fed_prompt/*.yaml parses against the real signatures (nothing is instantiated)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "fed_prompt").glob("*.yaml"))


class _ParseOnly(LightningCLI):
    def instantiate_classes(self) -> None:  # parse and type-check only
        pass


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_and_says_how_to_run_it(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    assert lines[1] == f"# Run: python train.py fit --config configs/fed_prompt/{path.name}"
    cli = _ParseOnly(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(path)])
    fed = cli.config["trainer"]["strategy"]["init_args"]["federated"]
    if path.stem == "tiny_debug":  # the seconds-long mechanics check on a tiny random model
        assert cli.config["model"]["init_args"]["model"].startswith("tiny-")
        return
    assert fed["server"] in path.stem or path.stem.startswith(("fedpeptao", "smollm2"))
    assert cli.config["data"]["init_args"]["num_clients"] >= 20


def test_there_is_a_config_per_method() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"fedpeptao_code", "fedpeptao_clean", "fedavg", "fedavgm", "fedprox", "scaffold", "fedadam"} <= names
