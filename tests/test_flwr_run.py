"""``flwr run .`` from the checkout, as Flower 1.42's docs describe it: with no Flower configuration, flwr
writes a default ``$FLWR_HOME/config.toml`` whose default connection is the managed local SuperLink
(``address = ":local:"``), starts it in simulation mode and runs the app of ``[tool.flwr.app]`` on two
simulated SuperNodes. Ports and ``FLWR_HOME`` are private to the test; the SuperLink it leaves running is
stopped by its process group."""

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


def _stop_superlink(control_port: int) -> None:
    """Stop the detached local SuperLink that flwr started for this test (and what it started)."""
    needle = f"127.0.0.1:{control_port}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes()
            if b"flower-superlink" in cmd and needle in cmd:
                pgid = os.getpgid(int(proc.name))
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, sig)
                    time.sleep(3)


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
    finally:
        _stop_superlink(control_port)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Created default configuration" in log and "2 simulated SuperNodes" in log
    assert "round 1: val acc" in log
    record = json.loads((out / "history.json").read_text())
    assert record["config"]["method"] == "fedld" and record["config"]["num-partitions"] == 2
    last = record["history"][-1]
    assert last["round"] == 1 and last["train"]["replies"] == 2  # both simulated SuperNodes answered
    assert 0.0 <= last["test"]["accuracy"] <= 1.0
    shutil.rmtree(tmp_path / "flwr-home", ignore_errors=True)
