"""The baselines' commands (``robustlab antidote sweep|pipeline``): bad input is one line
and exit 2, with no run folder written."""

from __future__ import annotations

import pytest

from robustlab.cli import main


@pytest.mark.parametrize(
    "args",
    [
        ["--methods", "sft,bogus"],
        ["--methods", "lisa+sft"],
        ["--lrs", "1e-4,abc"],
        ["--lrs", "0"],
        ["--seeds", "0.5"],
        ["--param", "nope=1"],
        ["--param", "antidote_ratio=2"],
        ["--scale", "huge"],
        ["--data-dir", "/definitely/missing"],
        ["--config", "/definitely/missing.yaml"],
        ["--judge-model", "/some/beaver-dam"],  # the tiny model has no beaver-dam judge
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args):
    out = tmp_path / "sweep"
    code = main(["antidote", "sweep", "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:")
    assert not out.exists()


def test_pipeline_bad_method_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: /nowhere\nmethod: vaccine+bogus\n")
    code = main(["antidote", "pipeline", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bogus" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["pipeline", "sweep"])
def test_judge_model_flag_checks_a_local_folder_before_writing(tmp_path, capsys, command):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {base}\n")
    out = tmp_path / "run"
    code = main(
        [
            "antidote",
            command,
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--judge-model",
            str(tmp_path / "no_dam"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "judge model folder" in err[0] and "--judge-model" in err[0]
    assert not out.exists()
