"""Every configs/fed_prompt/*.yaml parses against the real signatures; the server is a typed class path."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "fed_prompt").glob("*.yaml"))
EXPECTED_SERVER = {
    "fedavg": "FedAvg",
    "fedavgm": "FedAvgM",
    "fedprox": "FedAvg",
    "scaffold": "Scaffold",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
}


class _ParseOnly(LightningCLI):
    def instantiate_classes(self) -> None:  # parse and type-check only
        pass


def _parse(*args: str) -> LightningCLI:
    return _ParseOnly(subclass_mode_model=True, subclass_mode_data=True, run=False, args=list(args))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_and_says_how_to_run_it(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    assert lines[1] == f"# Run: python train.py fit --config configs/fed_prompt/{path.name}"
    cli = _parse("--config", str(path))
    fed = cli.config["trainer"]["strategy"]["init_args"]["federated"]
    server = fed["server"]["class_path"]
    assert server.startswith("privtune.federated.")
    if path.stem == "tiny_debug":  # the seconds-long mechanics check on a tiny random model
        assert cli.config["model"]["init_args"]["model"].startswith("tiny-")
        return
    if path.stem.startswith(("fedpeptao", "smollm2")):
        assert server == "privtune.federated.FedPepTAOServer"
    else:
        assert server.rsplit(".", 1)[1] == EXPECTED_SERVER[path.stem]
    assert (fed["proximal_mu"] > 0) == (path.stem == "fedprox")
    assert (fed["client_dp"] is not None) == path.stem.endswith("client_dp")
    assert cli.config["data"]["init_args"]["num_clients"] >= 20


def test_there_is_a_config_per_method() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"fedpeptao_code", "fedpeptao_clean", "fedavg", "fedavgm", "fedprox", "scaffold", "fedadam"} <= names


def test_server_init_args_are_type_checked() -> None:
    tiny = str(Path(__file__).parents[1] / "configs" / "fed_prompt" / "tiny_debug.yaml")
    key = "--trainer.strategy.init_args.federated"
    # a typed argument of the server class is accepted and converted
    cli = _parse(
        "--config",
        tiny,
        f'{key}={{"server": {{"class_path": "privtune.federated.FedAdam", "init_args": {{"eta": "0.5"}}}}}}',
    )
    assert cli.config["trainer"]["strategy"]["init_args"]["federated"]["server"]["init_args"]["eta"] == 0.5
    bad = [
        '{"server": {"class_path": "privtune.federated.FedAdam", "init_args": {"etaa": 0.5}}}',  # unknown argument
        '{"server": {"class_path": "privtune.federated.FedAdam", "init_args": {"eta": "fast"}}}',  # wrong type
        '{"server": "fedadam"}',  # the old string switch
        '{"server": {"class_path": "torch.nn.Linear"}}',  # not a server optimizer
        '{"server": {"class_path": "privtune.federated.FedPepTAOServer", "init_args": {"preset": "fast"}}}',
    ]
    for value in bad:
        with pytest.raises(SystemExit):
            _parse("--config", tiny, f"{key}={value}")
