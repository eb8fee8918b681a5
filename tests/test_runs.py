"""Run folders: atomic writes survive crashes, resume skips finished work, configs are guarded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from robustlab.errors import UserError
from robustlab.runs import RunDir, atomic_write_json, cell_key, read_json, read_jsonl


def test_atomic_write_keeps_old_file_when_crash_before_rename(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"v": 1})

    def crash(*_a, **_k):
        raise KeyboardInterrupt("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(target, {"v": 2, "big": list(range(10_000))})
    monkeypatch.undo()
    assert read_json(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp file left behind


def test_atomic_write_survives_sigkill(tmp_path):
    """A writer killed at a random moment leaves a complete file, never a torn one."""
    target = tmp_path / "state.json"
    child = textwrap.dedent(f"""
        from robustlab.runs import atomic_write_json
        i = 0
        while True:
            atomic_write_json({str(target)!r}, {{"i": i, "payload": [i] * 200_000}})
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    deadline = time.time() + 30
    while not target.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = read_json(target)
    assert data["payload"] == [data["i"]] * 200_000


def test_metrics_log_drops_torn_tail_and_appends_cleanly(tmp_path):
    run = RunDir.open(tmp_path / "run", {"a": 1}, seed=3)
    run.log(step=1, loss=0.5)
    run.log(step=2, loss=0.25)
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-line
    assert [r["step"] for r in read_jsonl(run.path / "metrics.jsonl")] == [1, 2]
    run = RunDir.open(tmp_path / "run", {"a": 1}, seed=3)  # reopening repairs the tail
    run.log(step=3, loss=0.125)
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]


def test_run_folder_layout_and_env(tmp_path):
    run = RunDir.open(tmp_path / "run", {"lr": 0.01, "K": [1, 2]}, seed=7)
    run.write_summary({"best": 0.9})
    names = sorted(p.name for p in run.path.iterdir())
    assert names == ["config.yaml", "env.json", "metrics.jsonl", "summary.json"] or names == [
        "config.yaml",
        "env.json",
        "summary.json",
    ]
    env = read_json(run.path / "env.json")
    assert env["seed"] == 7 and env["python"] == sys.version.split()[0]
    assert env["packages"]["numpy"] is not None
    assert run.summary() == {"best": 0.9}


def test_resume_skips_finished_cells(tmp_path):
    calls = []

    def work(k):
        calls.append(k)
        return {"k": k, "sq": k * k}

    run = RunDir.open(tmp_path / "run", {"grid": [1, 2, 3]})
    for k in (1, 2):
        run.cached(cell_key(k=k), lambda k=k: work(k))
    run = RunDir.open(tmp_path / "run", {"grid": [1, 2, 3]})  # the same command, rerun
    results = [run.cached(cell_key(k=k), lambda k=k: work(k)) for k in (1, 2, 3)]
    assert calls == [1, 2, 3]
    assert [r["sq"] for r in results] == [1, 4, 9]
    assert run.done_keys() == ["k=1", "k=2", "k=3"]


def test_killed_run_resumes_without_recomputing(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "computed.txt"
    child = textwrap.dedent(f"""
        import time
        from robustlab.runs import RunDir, cell_key
        run = RunDir.open({str(out)!r}, {{"cells": 8}})
        for c in range(8):
            def work(c=c):
                time.sleep(0.15)
                with open({str(log)!r}, "a") as f:
                    f.write(f"{{c}}\\n")
                return c
            run.cached(cell_key(c=c), work)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().split()) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = log.read_text().split()
    assert 3 <= len(first) < 8
    subprocess.run([sys.executable, "-c", child], check=True)
    computed = log.read_text().split()
    done = RunDir(out).done_keys()
    assert len(done) == 8
    # every cell computed once, except possibly the one in flight at the kill (never saved, so recomputed)
    assert len(computed) - 8 <= 1
    assert sorted(set(computed)) == [str(c) for c in range(8)]


def test_reopening_with_a_different_config_is_a_user_error(tmp_path):
    RunDir.open(tmp_path / "run", {"lr": 0.01, "workers": 1}, resume_keys=["lr"])
    RunDir.open(tmp_path / "run", {"lr": 0.01, "workers": 4}, resume_keys=["lr"])  # workers may change
    with pytest.raises(UserError, match="differs in: lr"):
        RunDir.open(tmp_path / "run", {"lr": 0.1, "workers": 4}, resume_keys=["lr"])


def test_cell_keys_are_file_safe():
    key = cell_key(algo="alg 2/x", K=1000, seed=3)
    assert "/" not in key and " " not in key
    assert json.dumps(key)


@pytest.mark.parametrize(("umask", "file_mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_permissions_of_a_plain_write(tmp_path, umask, file_mode):
    """Run folders, reports and results are readable by whoever the user's umask lets read them (0644 under
    the usual 022), also after an atomic replace, which would otherwise keep mkstemp's private 0600."""
    from robustlab.report import Report, Section, pyplot, save_figure

    old = os.umask(umask)
    try:
        run = RunDir.open(tmp_path / "run", {"a": 1}, seed=0)
        run.log(step=1)
        run.save(cell_key(k=1), {"k": 1})
        run.write_summary({"v": 1})
        run.write_summary({"v": 2})  # the atomic replace of an existing file
        fig, ax = pyplot().subplots()
        ax.plot([0, 1])
        png = save_figure(fig, tmp_path / "run" / "plot.png")
        report = Report("r")
        report.add(Section("s").table("T", ["a"], [[1]]).figure("F", png))
        report.write(tmp_path / "report")
        reference = tmp_path / "plain.txt"
        reference.write_text("x")  # what a plain write gives under this umask
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        dirs = [p for p in tmp_path.rglob("*") if p.is_dir()]
    finally:
        os.umask(old)
    names = {p.name for p in files}
    assert {"config.yaml", "env.json", "metrics.jsonl", "summary.json", "k=1.json", "plot.png"} <= names
    assert {"report.md", "report.html", "results.json"} <= names
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(file_mode) for f in files}
    assert oct(reference.stat().st_mode & 0o777) == oct(file_mode)
    assert all(d.stat().st_mode & 0o777 == 0o777 & ~umask for d in dirs)


def test_atomic_replace_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"v": 1})
    target.chmod(0o640)
    atomic_write_json(target, {"v": 2})
    assert read_json(target) == {"v": 2} and target.stat().st_mode & 0o777 == 0o640
