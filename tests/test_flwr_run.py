"""``flwr run .`` from the checkout, as Flower 1.42's docs describe it: with no Flower configuration, flwr
writes a default ``$FLWR_HOME/config.toml`` whose default connection is the managed local SuperLink
(``address = ":local:"``), starts it in simulation mode and runs the app of ``[tool.flwr.app]`` on two
simulated SuperNodes. Ports and ``FLWR_HOME`` are private to the test; what it leaves running is stopped by
process group."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLWR = Path(sys.executable).with_name("flwr")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not FLWR.exists(), reason="flwr (robustlab[fedld]) is not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_local_federation(*ports: int) -> None:
    """Stop what this test's ``flwr run`` left running: the detached SuperLink and the simulation it
    started (each in its own process group, found by the test's private ports)."""
    needles = [f"127.0.0.1:{p}".encode() for p in ports] + [f"--port {p}".encode() for p in ports]
    groups = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                if (b"flwr" in cmd or b"flower" in cmd) and any(n in cmd for n in needles):
                    groups.add(os.getpgid(int(proc.name)))
    groups.discard(os.getpgid(0))  # never the test's own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        time.sleep(3)


def _start_superlink_as_flwr_does(env: dict, http_port: int) -> None:
    """Under heavy load the managed SuperLink can miss flwr's fixed 15 s start-up deadline; the README's
    workaround is to start it once with flwr's own command line, which ``flwr run .`` then reuses."""
    home = Path(env["FLWR_HOME"]) / "local-superlink"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [str(FLWR.with_name("flower-superlink")), "--insecure", "--simulation", "--isolation", "subprocess"]
    cmd += ["--host", "127.0.0.1", "--port", str(http_port), "--database", str(home / "state.db")]
    subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", http_port), timeout=1):
            time.sleep(2)  # the port is open; give the HTTP app a moment
            return
        time.sleep(1)
    raise AssertionError("flower-superlink did not start within 240 s")


def test_flwr_run_dot_runs_the_app_on_a_local_simulation(tmp_path):
    http_port, control_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        # offline: the app's dependencies are the ones installed here, not fetched per run
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = tmp_path / "run"
    cmd = [str(FLWR), "run", str(ROOT), "--stream", "--run-config", f"num-server-rounds=1 out='{out}'"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 and "Failed to start local SuperLink within" in log:
            _start_superlink_as_flwr_does(env, http_port)
            proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
            log += proc.stdout + proc.stderr
    finally:
        _stop_local_federation(http_port, control_port)
    assert proc.returncode == 0, log[-3000:]
    assert "Created default configuration" in log and "2 simulated SuperNodes" in log
    assert "round 1: val acc" in log
    record = json.loads((out / "history.json").read_text())
    assert record["config"]["method"] == "fedld" and record["config"]["num-partitions"] == 2
    last = record["history"][-1]
    assert last["round"] == 1 and last["train"]["replies"] == 2  # both simulated SuperNodes answered
    assert 0.0 <= last["test"]["accuracy"] <= 1.0
    shutil.rmtree(tmp_path / "flwr-home", ignore_errors=True)
