"""privtune on Flower's deployment engine: one flower-superlink and two flower-supernode processes on localhost.

Insecure mode (no TLS, no node authentication) on free ports; ``flwr run`` submits the app; the final global prompt
and the bytes counted equal the in-process simulation with the same config and seed. Every process started here is
stopped (its whole process group) when the test ends (:func:`privtune.flower.local.local_federation`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from privtune.flower.local import local_federation, write_app  # noqa: E402
from tests.test_flower_app import in_process, write_config  # noqa: E402


def wait_for_report(out: Path, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not (out / "report.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return (out / "report.json").exists()


@pytest.mark.slow
def test_superlink_and_two_supernodes_equal_the_in_process_loop(tmp_path: Path) -> None:
    # each message starts a ClientApp process (Flower's subprocess isolation): evaluate once, at the end
    config = write_config(tmp_path, num_clients=2, eval_every=2)
    out = tmp_path / "flower_out"
    app = write_app(tmp_path / "app", config, out)
    with local_federation(tmp_path / "federation", num_supernodes=2) as federation:
        run = federation.run(app, timeout=420)
        logs = federation.logs()
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + logs
        assert wait_for_report(out), run.stdout[-3000:] + logs
    reference = in_process(config)
    final = torch.load(out / "global_prompt.pt", weights_only=True)
    for name, value in reference.global_state.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["selected_layers"] == reference.selected
    assert report["ledger"]["up_bytes"] == reference.ledger.summary()["up_bytes"] > 0
    assert report["ledger"]["down_bytes"] == reference.ledger.summary()["down_bytes"]
    # every train message ran in a fresh ClientApp process that built the model (Flower 1.42: a process per message)
    for row in report["history"]:
        assert row["flower/client_process_seconds_max"] >= row["flower/client_build_seconds_max"] > 0


@pytest.mark.slow
def test_flwr_run_in_simulation_equals_the_in_process_loop(tmp_path: Path) -> None:
    """``flwr run`` on a SuperLink in simulation mode (Ray plays the 3 SuperNodes) gives the same global prompt."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray (flwr[simulation])")
    config = write_config(tmp_path)
    out = tmp_path / "flower_out"
    app = write_app(tmp_path / "app", config, out)
    with local_federation(tmp_path / "federation", num_supernodes=3, simulation=True) as federation:
        run = federation.run(app, timeout=420, extra=["--federation-config", "num-supernodes=3"])
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + federation.logs()
        wait_for_report(out)
    reference = in_process(config)
    final = torch.load(out / "global_prompt.pt", weights_only=True)
    for name, value in reference.global_state.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["ledger"]["up_bytes"] == reference.ledger.summary()["up_bytes"] > 0


def test_every_process_of_a_local_federation_is_stopped_even_on_error(tmp_path: Path) -> None:
    """The context manager tears down the SuperLink and the SuperNodes' process groups when its body raises."""
    started = []

    def fail_inside() -> None:
        with local_federation(tmp_path / "federation", num_supernodes=1) as federation:
            started.extend(federation.processes)
            raise RuntimeError("body failed")

    with pytest.raises(RuntimeError, match="body failed"):
        fail_inside()
    assert len(started) == 2  # the SuperLink and one SuperNode
    for proc in started:
        assert proc.poll() is not None


def test_a_local_federation_needs_a_supernode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_supernodes"), local_federation(tmp_path, num_supernodes=0):
        pass
