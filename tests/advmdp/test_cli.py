"""CLI: one-line errors with exit code 2 and nothing written for bad input; a tiny run end to end."""

import json

import numpy as np
import pytest

from robustlab.advmdp.mdp import LinearMDP
from robustlab.cli import main


def run_cli(args, capsys):
    code = main(["advmdp", *args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--K", "0"], "K must be positive"),
        (["--K", "-5"], "K must be positive"),
        (["--K", "100", "--gamma", "0"], "gamma must be > 0"),
        (["--K", "100", "--gamma", "-0.1"], "gamma must be > 0"),
        (["--K", "100", "--algorithms", "alg9"], "unknown algorithm"),
        (["--K", "100", "--losses", "nope"], "unknown loss sequence"),
        (["--K", "100", "--instance", "nope"], "unknown instance"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, err = run_cli(["regret", *args, "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_instance_file_errors(tmp_path, capsys):
    mdp = LinearMDP.random(3, 4, 3, 4, seed=0)
    bad_p = tmp_path / "badp.npz"
    mu = mdp.mu.copy()
    mu[1, 2] *= 1.7
    np.savez(bad_p, phi=mdp.phi, mu=mu, rho=mdp.rho)
    code, err = run_cli(
        ["regret", "--instance", str(bad_p), "--K", "10", "--out", str(tmp_path / "a")], capsys
    )
    assert code == 2 and "P is not stochastic" in err and err.count("\n") == 1
    bad_dim = tmp_path / "baddim.npz"
    np.savez(bad_dim, phi=mdp.phi, mu=mdp.mu[:, :3], rho=mdp.rho)
    code, err = run_cli(
        ["regret", "--instance", str(bad_dim), "--K", "10", "--out", str(tmp_path / "b")], capsys
    )
    assert code == 2 and "dimension mismatch" in err
    good = tmp_path / "good.npz"
    np.savez(good, phi=mdp.phi, mu=mdp.mu, rho=mdp.rho)
    theta = tmp_path / "theta.npy"
    np.save(theta, np.zeros((20, 3, 5)))
    code, err = run_cli(
        [
            "regret",
            "--instance",
            str(good),
            "--losses",
            str(theta),
            "--K",
            "10",
            "--out",
            str(tmp_path / "c"),
        ],
        capsys,
    )
    assert code == 2 and "dimension mismatch" in err
    assert not any((tmp_path / x).exists() for x in "abc")


def test_tiny_run_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "regret",
        "--instance",
        "small",
        "--K",
        "30,60",
        "--seeds",
        "3",
        "--algorithms",
        "alg2,uniform",
        "--out",
        str(out),
    ]
    assert main(["advmdp", *args]) == 0
    printed = capsys.readouterr().out
    assert "slope" in printed and "alg2" in printed
    summary = json.loads((out / "summary.json").read_text())
    s = summary["algorithms"]["uniform"]
    assert s["K"] == [30, 60] and len(s["regret_mean"]) == 2 and len(s["slope_ci95"]) == 2
    assert s["regret_ci95"][0][0] <= s["regret_mean"][0] <= s["regret_ci95"][0][1]
    assert (out / "regret.png").stat().st_size > 1000
    # a rerun resumes: no cell is recomputed
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert main(["advmdp", *args]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamp
    # a different configuration in the same folder is refused
    code, err = run_cli([*args[:-4], "--algorithms", "alg1", "--out", str(out)], capsys)
    assert code == 2 and "different configuration" in err


def test_summarize_and_tune_commands(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "regret",
        "--instance",
        "small",
        "--K",
        "20,40",
        "--seeds",
        "2",
        "--algorithms",
        "uniform,fullinfo",
    ]
    assert main(["advmdp", *args, "--out", str(out)]) == 0
    assert main(["advmdp", "summarize", "--out", str(out)]) == 0
    part = json.loads((out / "summary_partial.json").read_text())
    full = json.loads((out / "summary.json").read_text())
    assert part["K_finished"] == [20, 40]
    assert part["algorithms"]["fullinfo"]["regret_mean"] == full["algorithms"]["fullinfo"]["regret_mean"]
    code, err = run_cli(["summarize", "--out", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "not a regret run folder" in err

    tune_out = tmp_path / "tune"
    targs = [
        "tune",
        "--algorithms",
        "fullinfo",
        "--c-eta",
        "1,30",
        "--K",
        "40",
        "--seeds",
        "1",
        "--extend",
        "1",
        "--out",
        str(tune_out),
    ]
    assert main(["advmdp", *targs]) == 0
    res = json.loads((tune_out / "summary.json").read_text())["chosen"]["fullinfo"]
    best = min(res["final"], key=lambda p: p["mean_regret"])
    assert [res["c_eta"], res["c_beta"]] == [best["c_eta"], best["c_beta"]]
    # the protocol: with two values the best is on an edge, so the grid grows by one decade (extend 1);
    # the finalist (best screened point) and the half-decade neighbours of its c_eta get every seed
    grid = res["c_eta_grid"]
    assert len(grid) == 3 and (grid[0] == 0.1 or grid[-1] == 300.0)
    assert len(res["screened"]) == 3
    top = sorted(res["screened"], key=lambda p: p["mean_regret"])[:1]
    assert {p["c_eta"] for p in top} | set(res["c_eta_refined"]) == {p["c_eta"] for p in res["final"]}
    assert json.loads((tune_out / "constants.json").read_text())["fullinfo"] == [res["c_eta"], res["c_beta"]]
    code, err = run_cli(["tune", "--K", "0", "--out", str(tmp_path / "t2")], capsys)
    assert code == 2 and "K must be positive" in err
