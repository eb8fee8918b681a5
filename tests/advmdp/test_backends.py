"""The readable path (one screen per algorithm, steps.py), the batched NumPy engine and the numba backend
compute the same runs: same uniforms, same formulas, rtol 1e-9 for every algorithm and loss mode."""

import numpy as np
import pytest

from robustlab.advmdp.algorithms import get_spec, run_algorithm
from robustlab.advmdp.algorithms.specs import ALGORITHMS
from robustlab.advmdp.losses import make_losses
from robustlab.advmdp.mdp import LinearMDP
from robustlab.advmdp.readable import run_readable
from robustlab.errors import UserError

pytest.importorskip("numba")

NAMES = sorted(ALGORITHMS)
K = 40


@pytest.fixture(scope="module")
def small():
    return LinearMDP.random(3, 4, 3, 4, seed=7)


@pytest.mark.parametrize("loss_name", ["stochastic", "adaptive"])
@pytest.mark.parametrize("name", NAMES)
def test_readable_numpy_and_numba_agree(small, name, loss_name):
    mdp = small
    seq = make_losses(loss_name, mdp, K, seed=3)
    spec = get_spec(name)
    params = spec.params(2000, mdp.H, mdp.dim, mdp.n_actions)
    seeds = [4, 5]
    fast = run_algorithm(mdp, seq, spec, params, K, seeds, backend="numba")
    ref = run_algorithm(mdp, seq, spec, params, K, seeds, backend="numpy")
    assert fast.extra["backend"] == "numba" and ref.extra["backend"] == "numpy"
    assert fast.checkpoints == ref.checkpoints
    np.testing.assert_allclose(fast.regret_curve, ref.regret_curve, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fast.realized_regret, ref.realized_regret, rtol=1e-9, atol=1e-9)
    for b, s in enumerate(seeds):
        r = run_readable(mdp, seq, spec, params, K, s)
        assert fast.regret[b] == pytest.approx(r["regret"], rel=1e-9, abs=1e-9)
        assert fast.realized_regret[b] == pytest.approx(r["realized_regret"], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("dim", [8, 9])
def test_gram_paths_agree_at_d8_and_above(dim):
    """d = 8 takes the unrolled Gram kernel, d > 8 the generic one (d = 4 above is the padded one)."""
    mdp = LinearMDP.random(2, 5, 3, dim, seed=1)
    seq = make_losses("stochastic", mdp, 30, seed=0)
    spec = get_spec("alg2")
    params = spec.params(500, mdp.H, mdp.dim, mdp.n_actions)
    fast = run_algorithm(mdp, seq, spec, params, 30, [0], backend="numba")
    r = run_readable(mdp, seq, spec, params, 30, 0)
    assert fast.regret[0] == pytest.approx(r["regret"], rel=1e-9)


def test_switching_sequence_and_long_blocks_agree(small):
    """Across the backend's block boundary of uniforms (2^15 episodes) nothing changes."""
    from robustlab.advmdp.algorithms import fast

    mdp = small
    seq = make_losses("switching", mdp, 70, seed=0)
    spec = get_spec("alg1")
    params = spec.params(5000, mdp.H, mdp.dim, mdp.n_actions)
    old = fast._BLOCK
    try:
        fast._BLOCK = 16
        blocked = run_algorithm(mdp, seq, spec, params, 70, [2], backend="numba")
    finally:
        fast._BLOCK = old
    whole = run_algorithm(mdp, seq, spec, params, 70, [2], backend="numpy")
    np.testing.assert_allclose(blocked.regret_curve, whole.regret_curve, rtol=1e-9)


def test_unknown_backend_is_a_user_error(small):
    seq = make_losses("stochastic", small, 5)
    spec = get_spec("alg2")
    with pytest.raises(UserError, match="unknown backend"):
        run_algorithm(small, seq, spec, spec.params(5, 3, 4, 3), 5, [0], backend="jax")
