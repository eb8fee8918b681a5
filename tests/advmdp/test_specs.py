"""The frozen constants are the committed tuning result, and the controls share their algorithm's eta."""

import json
from pathlib import Path

import pytest

from robustlab.advmdp.algorithms.specs import ALGORITHMS, CONTROLLED, FROZEN_CONSTANTS, TUNING

TUNE = Path(__file__).resolve().parents[2] / "results" / "advmdp" / "tune"


def test_frozen_constants_are_the_committed_tuning_result():
    if not (TUNE / "summary.json").exists():
        pytest.skip("no committed tuning run in this checkout")
    chosen = json.loads((TUNE / "summary.json").read_text())["chosen"]
    for a, c in chosen.items():
        assert FROZEN_CONSTANTS[a] == pytest.approx((c["c_eta"], c["c_beta"]), rel=1e-5)
        assert TUNING[a]["on_grid_edge"] == c["on_grid_edge"]
        assert TUNING[a]["c_eta_grid"] == pytest.approx(c["c_eta_grid"], rel=1e-5)


@pytest.mark.parametrize("name", CONTROLLED)
def test_control_has_the_same_eta_and_no_estimator(name):
    spec, ctl = ALGORITHMS[name], ALGORITHMS[name + "_control"]
    assert ctl.regularizer == spec.regularizer and ctl.estimator == "exact_q" and not ctl.bonus
    for K in (10_000, 1_000_000):
        assert ctl.params(K, 5, 8, 5).eta == spec.params(K, 5, 8, 5).eta
