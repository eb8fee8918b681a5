"""Real deployment on loopback: ``flower-superlink`` + ``flower-supernode`` processes run the same ServerApp
and ClientApp as the simulation (``flwr run . <connection>``), with faults made by real signals:

* a SuperNode SIGKILLed mid-run (3 nodes): the federation finishes with the 2 left;
* the SuperLink (and the ServerApp it runs) SIGKILLed mid-run, the federation started again and the run
  resubmitted: it continues from its last checkpointed round and ends with the same global model and
  metrics as an uninterrupted run.

Small and bounded in time (scikit-learn digits, client-side evaluation off to halve the ClientApp process
starts; the simulation tests cover it). Every process started here, and its children, is killed at the end,
whatever happens."""

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

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEADLINE_S = 600  # one federation run, including process start-up (the machine is shared)


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


class Federation:
    """A SuperLink and ``n`` SuperNodes on loopback (each its own session, so a kill takes its children)."""

    def __init__(
        self, tmp_path: Path, procs: Processes, n: int, tag: str, state_dir: Path | None = None
    ) -> None:
        self.port = _free_port()
        self.state_dir = state_dir  # each SuperNode's own client-state folder (``state-dir`` node config)
        self.home = tmp_path / f"flwr_home_{tag}"
        self.home.mkdir()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO / "src"),
        }
        self.procs = procs
        self.superlink = procs.start(
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
             "--database", ":flwr-in-memory:", "--disable-runtime-dependency-installation"],
            tmp_path / f"superlink_{tag}.log", self.env,
        )  # fmt: skip
        _wait_port(self.port, 60)
        self.nodes = [self._node(tmp_path, i, n, tag) for i in range(n)]

    def _node(self, tmp_path: Path, i: int, n: int, tag: str) -> subprocess.Popen:
        return self.procs.start(
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
             "--host", "127.0.0.1", "--port", str(_free_port()),
             "--node-config", f"partition-id={i} num-partitions={n}" + self._state(i)],
            tmp_path / f"supernode{i}_{tag}.log", self.env,
        )  # fmt: skip

    def _state(self, i: int) -> str:
        return f" state-dir='{self.state_dir / f'node{i}'}'" if self.state_dir else ""

    def submit(self, run_config: str) -> None:
        submit = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "loopback", "--run-config", run_config],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout + submit.stderr


def _checkpointed_round(out: Path) -> int:
    try:
        with np.load(out / "checkpoint.npz") as z:
            return int(json.loads(z["history"].tobytes().decode())[-1]["round"])
    except (OSError, ValueError, KeyError, EOFError):  # absent, or being replaced this instant
        return -1


def _wait(procs: Processes, until, what: str, alive: list[subprocess.Popen]) -> None:
    t0 = time.monotonic()
    while not until():
        procs.remember_children()
        assert time.monotonic() - t0 < DEADLINE_S, f"timed out waiting for {what}"
        assert all(p.poll() is None for p in alive), f"a Flower process died while waiting for {what}"
        time.sleep(1)


def _kill_session(p: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its session (a SuperNode's ClientApp, a SuperLink's ServerApp)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)


RUN = "dataset='digits' method='fedld' fraction-evaluate=0.0 node-wait=5.0 round-timeout=150.0"


@pytest.mark.integration
@pytest.mark.slow
def test_a_supernode_killed_mid_run_and_the_federation_finishes_with_two(tmp_path):
    out = tmp_path / "lost"
    procs = Processes()
    t0 = time.monotonic()
    try:
        fed = Federation(tmp_path, procs, 3, "lost")
        fed.submit(f"{RUN} num-partitions=3 num-server-rounds=4 min-nodes=2 min-replies=2 out='{out}'")
        _wait(procs, lambda: _checkpointed_round(out) >= 1, "round 1", [fed.superlink, *fed.nodes])
        _kill_session(fed.nodes[2])
        killed_after = _checkpointed_round(out)
        _wait(procs, (out / "history.json").exists, "the end of the run", [fed.superlink, *fed.nodes[:2]])
    finally:
        procs.kill_all()
    history = json.loads((out / "history.json").read_text())["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3, 4]
    assert history[1]["train"]["replies"] == 3 and history[1]["diagnostics"]["nodes"] == 3
    last = history[-1]
    assert last["diagnostics"]["nodes"] == 2 and last["train"]["replies"] == 2 and not last["skipped"]
    assert all(0.0 <= h["test"]["accuracy"] <= 1.0 for h in history)
    assert all(h["diagnostics"]["update-ratio"] > 0 for h in history[1:] if not h["skipped"])
    print(f"lost node: killed after round {killed_after}; 4 rounds in {time.monotonic() - t0:.0f} s; "
          f"final test acc {last['test']['accuracy']:.4f}; nodes per round "
          f"{[h['diagnostics']['nodes'] for h in history[1:]]}")  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedld", "scaffold"])
def test_a_killed_superlink_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path, method):
    """SCAFFOLD is the stateful case: the server's ``c`` comes back from the ServerApp's checkpoint and each
    client's ``c_i`` from its SuperNode's ``state-dir`` (the SuperNodes are killed and restarted too)."""
    resumed, reference = tmp_path / "resumed", tmp_path / "reference"
    cfg = f"{RUN.replace('fedld', method)} num-partitions=2 num-server-rounds=4"
    state = (
        (tmp_path / "state_resumed", tmp_path / "state_reference") if method == "scaffold" else (None, None)
    )
    procs = Processes()
    t0 = time.monotonic()
    try:
        fed = Federation(tmp_path, procs, 2, "first", state[0])
        fed.submit(f"{cfg} out='{resumed}'")
        _wait(procs, lambda: _checkpointed_round(resumed) >= 2, "round 2", [fed.superlink, *fed.nodes])
        _kill_session(fed.superlink)  # the SuperLink and the ServerApp process it started
        killed_at = _checkpointed_round(resumed)
        assert killed_at < 4 and not (resumed / "history.json").exists()
        for node in fed.nodes:
            _kill_session(node)
        fed = Federation(tmp_path, procs, 2, "second", state[0])
        fed.submit(f"{cfg} out='{resumed}'")
        _wait(procs, (resumed / "history.json").exists, "the resumed run", [fed.superlink, *fed.nodes])
        t_resumed = time.monotonic() - t0
        if method == "scaffold":  # the reference's clients start from no state, as the first run's did
            procs.kill_all()
            fed = Federation(tmp_path, procs, 2, "third", state[1])
        fed.submit(f"{cfg} out='{reference}'")
        _wait(
            procs, (reference / "history.json").exists, "the uninterrupted run", [fed.superlink, *fed.nodes]
        )
    finally:
        procs.kill_all()
    a = json.loads((resumed / "history.json").read_text())["history"]
    b = json.loads((reference / "history.json").read_text())["history"]
    assert [h["round"] for h in a] == [h["round"] for h in b] == [0, 1, 2, 3, 4]
    for ha, hb in zip(a, b, strict=True):
        assert ha["val"] == hb["val"] and ha["test"] == hb["test"], ha["round"]
    with np.load(resumed / "checkpoint.npz") as za, np.load(reference / "checkpoint.npz") as zb:
        for k in za.files:
            if k.startswith("g::"):
                np.testing.assert_array_equal(za[k], zb[k])
    if method == "scaffold":  # the server control variate was checkpointed and restored, not re-zeroed
        with np.load(resumed / "checkpoint.npz") as za:
            assert any(k.startswith("s::") and np.abs(za[k]).sum() > 0 for k in za.files)
        assert sorted(p.name for p in (state[0] / "node0").rglob("*.npz"))  # c_i on the node's own disk
    print(f"{method}: killed SuperLink after round {killed_at}; resumed run done at {t_resumed:.0f} s; final test acc "
          f"{a[-1]['test']['accuracy']:.4f} (resumed) vs {b[-1]['test']['accuracy']:.4f} (uninterrupted)")  # fmt: skip
