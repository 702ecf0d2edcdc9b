"""privtune on Flower's deployment engine: one flower-superlink and two flower-supernode processes on localhost.

Insecure mode (no TLS, no node authentication) on free ports; ``flwr run`` submits the app; the final global prompt
and the bytes counted equal the in-process simulation with the same config and seed. Every process started here is
stopped (its whole process group) when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from tests.test_flower_app import in_process, write_config  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def write_app(folder: Path, config: Path, out: Path) -> Path:
    """A Flower app project: privtune's apps by import path, the privtune config in the run config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        'name = "privtune-fedprompt"\n'
        'version = "1.0.0"\n'
        'description = "privtune federated prompt tuning on Flower"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "privtune"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "privtune.flower.server_app:app"\n'
        'clientapp = "privtune.flower.client_app:app"\n\n'
        "[tool.flwr.app.config]\n"
        f'config = "{config}"\n'
        f'output-dir = "{out}"\n'
        "node-wait-seconds = 120\n"
        "reproducible-noise = false\n"
    )
    return folder


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in reversed(started):  # each in its own session: stop it and what it spawned (SuperExec, apps)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 10
    for proc in started:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for proc in started:  # children left in the group (none expected)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_superlink_and_two_supernodes_equal_the_in_process_loop(
    tmp_path: Path, processes: list[subprocess.Popen]
) -> None:
    # each message starts a ClientApp process (Flower's subprocess isolation): evaluate once, at the end
    config = write_config(tmp_path, num_clients=2, eval_every=2)
    out = tmp_path / "flower_out"
    app = write_app(tmp_path / "app", config, out)
    home = tmp_path / "flwr_home"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def start(args: list[str], log: str) -> subprocess.Popen:
        handle = (tmp_path / log).open("w")
        proc = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        processes.append(proc)
        return proc

    start(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--port",
            str(link),
            "--health-server-address",
            f"127.0.0.1:{free_port()}",
            "--database",
            str(tmp_path / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ],
        "superlink.log",
    )
    wait_for_port(link, 60)
    for pid in range(2):
        start(
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={pid} num-partitions=2",
            ],
            f"supernode{pid}.log",
        )
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "local", "--stream"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + logs
    deadline = time.monotonic() + 60
    while not (out / "report.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (out / "report.json").exists(), run.stdout[-3000:] + logs
    reference = in_process(config)
    final = torch.load(out / "global_prompt.pt", weights_only=True)
    for name, value in reference.global_state.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["selected_layers"] == reference.selected
    assert report["ledger"]["up_bytes"] == reference.ledger.summary()["up_bytes"] > 0
    assert report["ledger"]["down_bytes"] == reference.ledger.summary()["down_bytes"]


@pytest.mark.slow
def test_flwr_run_in_simulation_equals_the_in_process_loop(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    """``flwr run`` on a SuperLink in simulation mode (Ray plays the 3 SuperNodes) gives the same global prompt."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray (flwr[simulation])")
    config = write_config(tmp_path)
    out = tmp_path / "flower_out"
    app = write_app(tmp_path / "app", config, out)
    home = tmp_path / "flwr_home"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    handle = (tmp_path / "superlink.log").open("w")
    args = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--port", str(link)]
    args += ["--health-server-address", f"127.0.0.1:{free_port()}", "--disable-runtime-dependency-installation"]
    processes.append(
        subprocess.Popen(args, cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    )
    wait_for_port(link, 60)
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "sim", "--stream", "--federation-config", "num-supernodes=3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "superlink.log").read_text()
    deadline = time.monotonic() + 60
    while not (out / "report.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    reference = in_process(config)
    final = torch.load(out / "global_prompt.pt", weights_only=True)
    for name, value in reference.global_state.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["ledger"]["up_bytes"] == reference.ledger.summary()["up_bytes"] > 0
