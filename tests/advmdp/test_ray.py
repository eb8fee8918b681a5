"""Cells dispatched to a (local) Ray instance give the same resumable cell files as local processes."""

import json

import pytest

from robustlab.advmdp.experiment import RegretConfig, run_regret

pytest.importorskip("ray")


@pytest.mark.slow
@pytest.mark.integration
def test_regret_cells_on_a_local_ray_instance_equal_local_processes(tmp_path):
    base = dict(instance="small", algorithms=["alg2", "uniform"], K=[30, 60], seeds=2)
    local = run_regret(RegretConfig(**base, workers=1), tmp_path / "local", echo=lambda _m: None)
    on_ray = run_regret(
        RegretConfig(**base, workers=1, ray_address="local"), tmp_path / "ray", echo=lambda _m: None
    )
    for a in base["algorithms"]:
        assert on_ray["algorithms"][a]["regret_mean"] == pytest.approx(
            local["algorithms"][a]["regret_mean"], rel=1e-12
        )
    names = sorted(p.name for p in (tmp_path / "ray" / "cells").glob("*.json"))
    assert names == sorted(p.name for p in (tmp_path / "local" / "cells").glob("*.json")) and len(names) == 4
    cell = json.loads((tmp_path / "ray" / "cells" / names[0]).read_text())
    assert cell["K"] in (30, 60) and len(cell["regret"]) in (1, 2)
    # resuming the Ray run folder runs nothing (and needs no cluster)
    again = []
    run_regret(RegretConfig(**base, workers=1, ray_address="local"), tmp_path / "ray", echo=again.append)
    assert not any("cells to run" in m for m in again)
