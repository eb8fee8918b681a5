"""The CLI: help, version, one-line user errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import robustlab
from robustlab.cli import main
from robustlab.errors import UserError

ROBUSTLAB = Path(sys.executable).with_name("robustlab")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"robustlab {robustlab.__version__}"


def test_help_lists_reproduce(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "reproduce" in out


def test_user_error_is_one_line_exit_2(capsys, tmp_path):
    code = main(["reproduce", "--only", "nosuchsystem", "--out", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown system in --only: nosuchsystem")
    assert "Traceback" not in captured.err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_quick_and_full_together_is_a_user_error(capsys):
    assert main(["reproduce", "--quick", "--full"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.integration
def test_console_script_prints_one_line_and_exits_2(tmp_path):
    exe = str(ROBUSTLAB) if ROBUSTLAB.exists() else None
    cmd = [exe] if exe else [sys.executable, "-m", "robustlab.cli"]
    proc = subprocess.run(
        [*cmd, "reproduce", "--only", "bogus"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "120"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown system in --only: bogus; choose from advmdp, fedld, antidote (comma-separated)"
    ]


def test_user_error_message_shape():
    err = UserError("K must be positive, got -3", "pass --K 1000,3000")
    assert str(err) == "K must be positive, got -3; pass --K 1000,3000"
    assert "\n" not in UserError("a\nb", "c\nd").one_line()
