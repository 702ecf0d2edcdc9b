"""A Flower federation on localhost: one ``flower-superlink`` and N ``flower-supernode`` processes, for tests and
benchmarks.

:func:`local_federation` starts the SuperLink (insecure mode, free ports, its own state database) and, for the
deployment engine, one SuperNode per partition (``partition-id=i num-partitions=N``), each in its own session;
``flwr run`` then submits an app to it (:meth:`LocalFederation.run`). Every process started is stopped with its
whole process group (the SuperExec and the ClientApp / ServerApp processes it spawned) when the context exits,
also on errors. With ``simulation=True`` the SuperLink runs Flower's simulation engine (Ray plays the SuperNodes)
and no SuperNode is started.

Threat model: none. Insecure mode has no TLS and no node authentication and is for one machine only; across
machines follow docs/flower.md (TLS certificates, node authentication).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
FEDERATION = "local"


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> None:
    """Return once something listens on ``127.0.0.1:port``.

    Raises:
        TimeoutError: after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def write_app(folder: Path, config: Path, out: Path, *, node_wait_seconds: int = 120) -> Path:
    """A Flower app project in ``folder``: privtune's apps by import path, the privtune config in the run config.

    Args:
        folder: where ``pyproject.toml`` is written (created if missing).
        config: the privtune federated config the apps build from.
        out: the ServerApp's output folder (``report.json``, ``global_prompt.pt``).
        node_wait_seconds: how long the ServerApp waits for the SuperNodes to connect.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "privtune-fedprompt"\nversion = "1.0.0"\n'
        'description = "privtune federated prompt tuning on Flower"\nlicense = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "privtune"\n\n'
        '[tool.flwr.app.components]\nserverapp = "privtune.flower.server_app:app"\n'
        'clientapp = "privtune.flower.client_app:app"\n\n'
        f'[tool.flwr.app.config]\nconfig = "{config}"\noutput-dir = "{out}"\n'
        f"node-wait-seconds = {node_wait_seconds}\nreproducible-noise = false\n"
    )
    return folder


@dataclass
class LocalFederation:
    """A running local federation (see :func:`local_federation`).

    Attributes:
        folder: the working folder (logs ``*.log``, the SuperLink's database, ``FLWR_HOME``).
        env: the environment of every process (``FLWR_HOME``, offline Hugging Face, this interpreter's ``bin``).
        port: the SuperLink's port for ``flwr`` (the Control API).
        superlink_up_seconds: from launching the SuperLink to its port accepting connections.
        launched: ``time.time()`` when the SuperLink was launched.
        processes: the processes started (each the leader of its own process group).
    """

    folder: Path
    env: dict[str, str]
    port: int
    superlink_up_seconds: float
    launched: float
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, app: Path, timeout: float, extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """``flwr run <app> local --stream`` (plus ``extra`` arguments), waiting at most ``timeout`` seconds."""
        return subprocess.run(
            [str(BIN / "flwr"), "run", str(app), FEDERATION, "--stream", *extra],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self, tail: int = 3000) -> str:
        """The last ``tail`` characters of each process's log, for an error message."""
        return "\n".join(f"--- {p.name}\n{p.read_text()[-tail:]}" for p in sorted(self.folder.glob("*.log")))


def _start(federation: LocalFederation, args: list[str], log: str) -> None:
    handle = (federation.folder / log).open("w")
    federation.processes.append(
        subprocess.Popen(
            args,
            cwd=federation.folder,
            env=federation.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )


def stop_process_groups(processes: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process's group (newest first), SIGKILL what is left after ``grace`` seconds."""
    for proc in reversed(processes):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for proc in processes:  # children left in a group (none expected)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def local_federation(folder: Path, num_supernodes: int, *, simulation: bool = False) -> Iterator[LocalFederation]:
    """A SuperLink and ``num_supernodes`` SuperNodes on localhost (insecure), stopped with their groups on exit.

    Args:
        folder: a working folder of its own (logs, database, ``FLWR_HOME``).
        num_supernodes: SuperNodes to start, partition ids ``0 .. num_supernodes - 1`` (the deployment engine);
            with ``simulation`` the number of simulated nodes is given to :meth:`LocalFederation.run` instead
            (``--federation-config num-supernodes=N``) and none is started here.
        simulation: run the SuperLink with Flower's simulation engine.

    Raises:
        ValueError: if ``num_supernodes < 1`` for the deployment engine.
        TimeoutError: if the SuperLink does not listen within 60 s.
    """
    if not simulation and num_supernodes < 1:
        raise ValueError(f"local_federation: `num_supernodes` must be >= 1; got {num_supernodes}.")
    folder.mkdir(parents=True, exist_ok=True)
    home = folder / "flwr_home"
    home.mkdir(exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    federation = LocalFederation(folder, env, port, 0.0, time.time())
    try:
        link = [str(BIN / "flower-superlink"), "--insecure", "--port", str(port)]
        link += ["--health-server-address", f"127.0.0.1:{free_port()}", "--disable-runtime-dependency-installation"]
        link += ["--simulation"] if simulation else ["--database", str(folder / "superlink.db")]
        _start(federation, link, "superlink.log")
        wait_for_port(port, 60)
        federation.superlink_up_seconds = time.time() - federation.launched
        for pid in range(0 if simulation else num_supernodes):
            node = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}"]
            node += ["--port", str(free_port()), "--node-config", f"partition-id={pid} num-partitions={num_supernodes}"]
            _start(federation, node, f"supernode{pid}.log")
        yield federation
    finally:
        stop_process_groups(federation.processes)
