"""The sweep: resumable cells over several grids, local slopes, R - R_control, tables and the plot."""

import itertools
import json
import math

import numpy as np
import pytest

from robustlab.advmdp.sweep import SweepConfig, build_report, run_sweep, summarise_cells


def fake_cells(Ks, power, noise=0.0, seeds=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        K: {
            "regret": list(3.0 * K**power * (1 + noise * rng.normal(size=seeds))),
            "params": [{}],
            "seconds": 0.0,
        }
        for K in Ks
    }


def test_local_slopes_recover_a_known_power_law():
    Ks = [10_000, 30_000, 100_000, 300_000, 1_000_000]
    s = summarise_cells(
        fake_cells(Ks, 0.5), fake_cells(Ks, 0.25, seeds=1), np.random.default_rng(0), reps=200
    )
    assert [x["K"] for x in s["local_slopes"]] == [list(p) for p in itertools.pairwise(Ks)]
    for x in s["local_slopes"]:
        assert x["slope"] == pytest.approx(0.5, abs=1e-12)
        assert x["ci95"][0] == pytest.approx(0.5, abs=1e-9) and x["ci95"][1] == pytest.approx(0.5, abs=1e-9)
    assert s["last_decade"]["K"] == [100_000, 1_000_000]
    assert s["last_decade"]["slope"] == pytest.approx(0.5, abs=1e-12)
    assert s["regret_over_sqrtK"] == pytest.approx([3.0] * 5)
    d = {x["K"]: x["diff"] for x in s["minus_control"]}
    assert d[10_000] == pytest.approx(3.0 * 100 - 3.0 * 10)
    # noisy seeds (5% per seed): the estimate is close to the truth and its interval has positive width
    noisy = summarise_cells(
        fake_cells(Ks, 2 / 3, noise=0.05, seeds=10), None, np.random.default_rng(1), reps=500
    )
    lo, hi = noisy["last_decade"]["ci95"]
    assert noisy["last_decade"]["slope"] == pytest.approx(2 / 3, abs=0.03)
    assert lo <= noisy["last_decade"]["slope"] <= hi and 0.002 < hi - lo < 0.1


def test_sweep_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "sweep"
    cfg = SweepConfig(
        instances=["small"],
        losses=["stochastic", "switching"],
        algorithms=["alg2", "fullinfo", "alg2_control"],
        K=[100, 300, 1000],
        seeds=3,
        seeds_at=[[1000, 2]],
    )
    run_sweep(cfg, out, echo=lambda _m: None)
    cells = sorted(p.name for p in (out / "small-stochastic" / "cells").glob("*.json"))
    assert len(cells) == 9
    again = []
    run_sweep(cfg, out, echo=again.append)
    assert again == ["sweep: 0 cells to run on 1 worker(s)"]
    summary = build_report(out, tmp_path / "plot.png", echo=lambda _m: None)
    g = summary["grids"]["small-stochastic"]["algorithms"]
    assert g["alg2"]["seeds"] == [3, 3, 2]
    assert g["alg2_control"]["seeds"] == [1, 1, 1]  # deterministic: one seed is the whole distribution
    ctl = json.loads((out / "small-stochastic" / "cells" / "algorithm=alg2_control__K=300.json").read_text())
    assert g["alg2"]["minus_control"][1]["diff"] == pytest.approx(
        g["alg2"]["regret_mean"][1] - ctl["regret"][0]
    )
    r = g["alg2"]["regret_mean"]
    assert g["alg2"]["local_slopes"][0]["slope"] == pytest.approx(math.log(r[1] / r[0]) / math.log(3))
    # an extension to larger K with one seed, in its own folder, joins the same grid
    ext = SweepConfig(
        instances=["small"], losses=["stochastic"], algorithms=["alg2"], K=[3000], seeds=1, tag="-ext"
    )
    run_sweep(ext, out, echo=lambda _m: None)
    merged = build_report(out, None, echo=lambda _m: None)["grids"]["small-stochastic"]
    assert merged["folders"] == ["small-stochastic", "small-stochastic-ext"]
    assert merged["algorithms"]["alg2"]["K"] == [100, 300, 1000, 3000]
    assert merged["algorithms"]["alg2"]["seeds"] == [3, 3, 2, 1]
    tables = (out / "tables.md").read_text()
    assert "alg2 − control" in tables and "last decade" in tables
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_per_instance_grid_caps_and_seed_counts():
    cfg = SweepConfig(max_K=[["standard", 300_000]], seeds_at=[[300_000, 3]])
    std, small = cfg.regret_config("standard", "stochastic"), cfg.regret_config("small", "switching")
    assert std.K == [10_000, 30_000, 100_000, 300_000] and small.K[-1] == 1_000_000
    assert std.seeds_for(300_000) == 3 and std.seeds_for(100_000) == 10


def test_alg3_exploration_study(tmp_path):
    from robustlab.advmdp.sweep import alg3_exploration

    s = alg3_exploration(tmp_path / "x", [120], [0.0, 1.0], seeds=1, echo=lambda _m: None)
    by = {c["c_explore"]: c for c in s["cells"]}
    assert by[0.0]["delta_e"] == 0.0 and by[1.0]["delta_e"] == pytest.approx(120 ** (-1 / 9))
    assert "c_explore" in (tmp_path / "x" / "table.md").read_text()
