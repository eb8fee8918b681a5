"""Every path option of every command fails cleanly on a bad value: one ``error:`` line on stderr, exit
code 2, no traceback, nothing written. The commands are found by walking the CLI's click tree, so a new
command or option is covered without touching this file."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest

from robustlab.cli import build_command, main, path_role
from robustlab.errors import UserError
from robustlab.paths import check_input_path, check_output_dir, check_output_file


def _leaves(cmd: click.Command, path: tuple[str, ...] = ()):
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _leaves(sub, (*path, name))
    else:
        yield path, cmd


PATH_OPTIONS = [
    (path, param.opts[-1], *path_role(param))
    for path, cmd in _leaves(build_command())
    for param in cmd.params
    if path_role(param) is not None
]


def test_the_walk_finds_every_systems_path_options():
    commands = {p for p, *_ in PATH_OPTIONS}
    assert ("reproduce",) in commands
    for system in ("advmdp", "fedld", "antidote"):
        assert any(p[0] == system for p in commands), system
    outputs = [(p, flag) for p, flag, role, _ in PATH_OPTIONS if role == "output"]
    assert (("reproduce",), "--out") in outputs and len(outputs) >= 8
    inputs = [(p, flag) for p, flag, role, _ in PATH_OPTIONS if role == "input"]
    assert (("antidote", "realign"), "--calibration") in inputs and (("fedld", "run"), "--data-dir") in inputs


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _bad_values(role: str, kind: str, tmp: Path) -> list[str]:
    a_file = tmp / "a_file"
    a_file.write_text("x")
    if role == "output":
        return [
            "/proc/robustlab-nope/run",  # /proc takes no new folders, even for root
            str(a_file),  # a file where a folder is needed
            str(a_file / "sub"),  # below a file
            str(tmp / ("n" * 300)),  # a name longer than any filesystem allows
            str(tmp / "bad\0name"),
        ]
    if role == "output file":
        return ["/proc/robustlab-nope/plot.png", str(tmp), str(a_file / "plot.png"), str(tmp / "bad\0name")]
    bad = [str(tmp / "missing"), str(tmp / "bad\0name")]
    if kind == "file":
        bad.append(str(tmp))
    if kind == "dir":
        bad.append(str(a_file))
    return bad


@pytest.mark.parametrize(
    ("command", "flag", "role", "kind"), PATH_OPTIONS, ids=[f"{' '.join(c)} {f}" for c, f, *_ in PATH_OPTIONS]
)
def test_bad_path_is_one_line_exit_2_nothing_written(
    command, flag, role, kind, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # a command that fell through would write relative defaults here
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for bad in _bad_values(role, kind, inputs):
        before = _tree(tmp_path)
        # the bad option comes first, so it is checked before anything else (required options included)
        code = main([*command, flag, bad])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (bad, err)
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), (bad, err)
        assert "Traceback" not in err
        assert _tree(tmp_path) == before, bad


def test_output_files_need_not_exist(tmp_path, capsys):
    """A plot path is written, not read: a new file in a new folder passes the check."""
    roles = {(c, f): r for c, f, r, _ in PATH_OPTIONS}
    assert roles[(("advmdp", "sweep-report"), "--plot")] == "output file"
    assert check_output_file(tmp_path / "new" / "plot.png", "--plot") == tmp_path / "new" / "plot.png"
    assert list(tmp_path.iterdir()) == []


def test_the_checks_leave_nothing_behind(tmp_path):
    target = tmp_path / "new" / "run"
    assert check_output_dir(target) == target
    assert check_output_dir(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []  # the write probe is removed, the folder not yet made
    with pytest.raises(UserError, match="does not exist"):
        check_input_path(tmp_path / "x.jsonl", "--calibration", "file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder whatever its mode")
def test_unwritable_folder_is_a_user_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(UserError, match="cannot be created in"):
            check_output_dir(locked / "run")
        with pytest.raises(UserError, match="is not writable"):
            check_output_dir(locked)
    finally:
        locked.chmod(0o700)


def test_a_good_path_reaches_the_command(tmp_path, capsys):
    """The check does not get in the way: summarising an empty folder is the command's own error."""
    code = main(["advmdp", "summarize", "--out", str(tmp_path)])
    assert code == 2 and "regret run folder" in capsys.readouterr().err
