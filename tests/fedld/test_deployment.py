"""Real deployment on loopback: ``flower-superlink`` + 2 ``flower-supernode`` processes run the same
ServerApp and ClientApp as the simulation (``flwr run . <connection>``), 2 rounds, bounded in time
(client-side evaluation is off to halve the ClientApp process starts; the simulation tests cover it); every
process started here (and its children) is killed at the end, whatever happens."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEADLINE_S = 420  # whole federation, including process start-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Processes:
    """Processes started by this test, each in its own session; ``kill_all`` ends them and their children."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.known: set[int] = set()

    def start(self, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        f = open(log, "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        self.procs.append(p)
        return p

    def remember_children(self) -> None:
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.known |= {c.pid for c in psutil.Process(p.pid).children(recursive=True)}

    def kill_all(self) -> None:
        self.remember_children()
        pids = [p.pid for p in self.procs] + sorted(self.known)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 10
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, end - time.monotonic()))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


@pytest.mark.integration
@pytest.mark.slow
def test_two_supernodes_on_loopback_run_two_rounds(tmp_path):
    port = _free_port()
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    out = tmp_path / "out"
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = Processes()
    t0 = time.monotonic()
    try:
        procs.start(
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--database", ":flwr-in-memory:", "--disable-runtime-dependency-installation"],
            tmp_path / "superlink.log", env,
        )  # fmt: skip
        _wait_port(port, 60)
        for i in range(2):
            procs.start(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--host", "127.0.0.1", "--port", str(_free_port()),
                 "--node-config", f"partition-id={i} num-partitions=2"],
                tmp_path / f"supernode{i}.log", env,
            )  # fmt: skip
        submit = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "loopback", "--run-config",
             f"num-server-rounds=2 num-partitions=2 method='fedld' fraction-evaluate=0.0 out='{out}'"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout + submit.stderr
        result = out / "history.json"
        while not result.exists():
            procs.remember_children()
            assert time.monotonic() - t0 < DEADLINE_S, "the federation did not finish in time"
            assert all(p.poll() is None for p in procs.procs), "a Flower process died"
            time.sleep(1)
    finally:
        procs.kill_all()
    history = json.loads(result.read_text())["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    for h in history[1:]:
        assert h["train"]["replies"] == 2 and h["train"]["failures"] == 0
        assert 0.0 <= h["test"]["accuracy"] <= 1.0
        assert h["diagnostics"]["update-ratio"] > 0  # FedLD's diagnostic travels through deployment too
    assert all(p.poll() is not None for p in procs.procs)
    print(f"loopback deployment: 2 supernodes, 2 rounds in {time.monotonic() - t0:.0f} s")
