"""The same federated run in one process and across 2 gloo DDP ranks gives the same prompts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "ddp_scripts" / "fed_ddp.py"


def _run(out: Path, mode: str, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PL_DISABLE_FORK": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), mode, *extra], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / f"result_{mode}.pt", weights_only=True)


@pytest.mark.ddp
@pytest.mark.slow
def test_one_process_and_two_ddp_ranks_give_the_same_prompts(tmp_path: Path) -> None:
    ddp = _run(tmp_path / "ddp", "ddp")
    single = _run(tmp_path / "single", "single")
    assert ddp["world_size"] == 2
    assert single["world_size"] == 1
    torch.testing.assert_close(ddp["prompt"]["prefix"], single["prompt"]["prefix"], rtol=1e-6, atol=1e-7)
    assert sorted(ddp["clients"]) == sorted(single["clients"])
    for cid, prompt in single["clients"].items():
        torch.testing.assert_close(ddp["clients"][cid], prompt, rtol=1e-6, atol=1e-7)
    accs = [h.get("fed/personalized_acc") for h in single["history"]]
    assert [h.get("fed/personalized_acc") for h in ddp["history"]] == pytest.approx(accs)


@pytest.mark.ddp
@pytest.mark.slow
def test_client_level_dp_noise_is_the_same_on_every_rank(tmp_path: Path) -> None:
    ddp = _run(tmp_path / "ddp", "ddp", "FedAvg", "dp")
    single = _run(tmp_path / "single", "single", "FedAvg", "dp")
    assert ddp["world_size"] == 2
    eps = [h["privacy/epsilon"] for h in single["history"]]
    assert [h["privacy/epsilon"] for h in ddp["history"]] == eps and 0 < eps[0] < eps[-1]
    torch.testing.assert_close(ddp["prompt"]["prefix"], single["prompt"]["prefix"], rtol=1e-6, atol=1e-7)


def _cli(out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PL_DISABLE_FORK": "1"}
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        str(root / "train.py"),
        "fit",
        "--config",
        str(root / "configs" / "fed_prompt" / "tiny_debug.yaml"),
        f'--trainer.strategy.init_args.federated={{"report_dir": "{out}"}}',
        f"--data.init_args.partition_dir={out}",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    report["prompt"] = torch.load(out / "global_prompt.pt")
    return report


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.assets
def test_cli_with_two_devices_matches_the_one_process_run(tmp_path: Path) -> None:
    ddp = _cli(
        tmp_path / "ddp", "--trainer.devices=2", "--trainer.strategy.class_path=privtune.strategies.FederatedDDP"
    )
    single = _cli(tmp_path / "single")
    assert (ddp["strategy"], ddp["world_size"]) == ("FederatedDDP", 2)
    assert (single["strategy"], single["world_size"]) == ("FederatedSimulation", 1)
    assert ddp["selected_layers"] == single["selected_layers"]
    assert set(ddp["prompt"]) == {"prefix"}  # the label-name head: only prompt slices are federated
    torch.testing.assert_close(ddp["prompt"]["prefix"], single["prompt"]["prefix"], rtol=1e-6, atol=1e-7)
    for key in ("up_bytes", "down_bytes", "total_bytes"):
        assert ddp["ledger"][key] == single["ledger"][key] > 0
    accs = [h.get("fed/personalized_acc") for h in single["history"]]
    assert [h.get("fed/personalized_acc") for h in ddp["history"]] == pytest.approx(accs)
