"""The engine against independent truth: exact DP for the uniform policy and for full-information PO, and
the simulator mode against the oracle mode (the backends against the readable path: test_backends.py)."""

import numpy as np
import pytest

from robustlab.advmdp import exact
from robustlab.advmdp.algorithms import Params, get_spec, run_algorithm
from robustlab.advmdp.ftrl import hedge
from robustlab.advmdp.losses import make_losses
from robustlab.advmdp.mdp import LinearMDP
from robustlab.errors import UserError


@pytest.fixture(scope="module")
def small():
    mdp = LinearMDP.random(3, 4, 3, 4, seed=7)
    return mdp, make_losses("stochastic", mdp, 200, seed=3)


@pytest.mark.parametrize("name", ["alg1", "alg2", "luo21"])
def test_batching_does_not_change_a_seeds_result(small, name):
    mdp, losses = small
    spec = get_spec(name)
    params = spec.params(2000, mdp.H, mdp.dim, mdp.n_actions)
    both = run_algorithm(mdp, losses, spec, params, 25, [4, 5], backend="numpy")
    alone = run_algorithm(mdp, losses, spec, params, 25, [5], backend="numpy")
    assert alone.regret[0] == pytest.approx(both.regret[1], rel=1e-9, abs=1e-9)


def test_uniform_regret_is_exact(small):
    mdp, losses = small
    K = 120
    res = run_algorithm(mdp, losses, get_spec("uniform"), Params(0.0), K, [0])
    pi = np.full((mdp.H, mdp.n_states, mdp.n_actions), 1 / mdp.n_actions)
    ref = exact.expected_regret(mdp, np.broadcast_to(pi, (K, *pi.shape)), losses.theta[:K])
    assert res.regret[0] == pytest.approx(ref, rel=1e-10)
    # prefix curve
    for c, r in zip(res.checkpoints, res.regret_curve[:, 0], strict=True):
        assert r == pytest.approx(
            exact.expected_regret(mdp, np.broadcast_to(pi, (c, *pi.shape)), losses.theta[:c]),
            rel=1e-9,
            abs=1e-9,
        )


def test_fullinfo_matches_independent_policy_optimisation(small):
    mdp, losses = small
    K, eta = 60, 0.3
    C = np.zeros((mdp.H, mdp.n_states, mdp.n_actions))
    pols = []
    for k in range(K):
        pi = hedge(C, eta)
        pols.append(pi)
        _, Q = exact.policy_evaluation(mdp, pi, mdp.loss_table(losses.theta[k]))
        C += Q
    ref = exact.expected_regret(mdp, np.array(pols), losses.theta[:K])
    res = run_algorithm(mdp, losses, get_spec("fullinfo"), Params(eta), K, [0, 1])
    assert np.allclose(res.regret, ref, rtol=1e-9)  # full information: no learner randomness in pi_k


def test_realized_regret_tracks_pseudo_regret(small):
    mdp, losses = small
    res = run_algorithm(mdp, losses, get_spec("uniform"), Params(0.0), 200, list(range(30)))
    diff = res.realized_regret - res.regret
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(len(diff)) + 1e-9


@pytest.mark.parametrize("name", ["alg2", "luo21"])
def test_simulator_mode_agrees_with_oracle_mode(small, name):
    mdp, losses = small
    spec = get_spec(name)
    K = 150
    params = spec.params(K, mdp.H, mdp.dim, mdp.n_actions)
    seeds = list(range(6))
    ora = run_algorithm(mdp, losses, spec, params, K, seeds, mode="oracle")
    sim = run_algorithm(mdp, losses, spec, params, K, seeds, mode="simulator")
    assert np.all(sim.simulator_calls > 0) and np.all(ora.simulator_calls == 0)
    se = np.sqrt(ora.regret.var(ddof=1) / len(seeds) + sim.regret.var(ddof=1) / len(seeds))
    assert abs(sim.regret.mean() - ora.regret.mean()) <= 4 * se + 0.05 * abs(ora.regret.mean())


def test_bad_parameters_raise_user_errors(small):
    mdp, losses = small
    spec = get_spec("alg2")
    with pytest.raises(UserError, match="gamma"):
        run_algorithm(mdp, losses, spec, Params(0.1, 0.1, 0.0), 10, [0])
    with pytest.raises(UserError, match="K must be"):
        run_algorithm(mdp, losses, spec, Params(0.1, 0.1, 0.1), 0, [0])
    with pytest.raises(UserError, match="unknown algorithm"):
        get_spec("alg9")
    other = LinearMDP.random(3, 4, 3, 5, seed=0)
    with pytest.raises(UserError, match="dimension mismatch"):
        run_algorithm(other, losses, spec, Params(0.1, 0.1, 0.1), 10, [0])


def test_adaptive_adversary_against_uniform_policy(small):
    """The adaptive adversary's response to the (fixed) uniform policy is a fixed theta: regret is exact."""
    from robustlab.advmdp.losses import adaptive_theta, make_losses

    mdp, _ = small
    K = 40
    seq = make_losses("adaptive", mdp, K)
    res = run_algorithm(mdp, seq, get_spec("uniform"), Params(0.0), K, [0, 1])
    pi = np.full((mdp.H, mdp.n_states, mdp.n_actions), 1 / mdp.n_actions)
    q = exact.occupancy(mdp, pi)
    phibar = np.einsum("hs,hsa,hsad->hd", q, pi, mdp.phi)
    theta = adaptive_theta(phibar)
    ref = exact.expected_regret(
        mdp, np.broadcast_to(pi, (K, *pi.shape)), np.broadcast_to(theta, (K, *theta.shape))
    )
    assert np.allclose(res.regret, ref)
    # a learning algorithm runs against it too (per-seed losses), with finite regret
    r2 = run_algorithm(
        mdp, seq, get_spec("alg2"), get_spec("alg2").params(K, mdp.H, mdp.dim, mdp.n_actions), K, [0, 1]
    )
    assert np.all(np.isfinite(r2.regret))


def test_alg3_runs_without_simulator_and_is_deterministic(small):
    from robustlab.advmdp.algorithms.alg3 import run_alg3

    mdp, losses = small
    r1 = run_alg3(mdp, losses, 150, seed=2)
    r2 = run_alg3(mdp, losses, 150, seed=2)
    assert r1.regret[0] == r2.regret[0] and np.isfinite(r1.regret[0])
    assert r1.simulator_calls[0] == 0
    assert r1.extra["schedule"]["W"] >= 2 and r1.params[0].gamma > 0


def test_alg3_regression_from_sufficient_statistics_equals_least_squares_on_the_samples():
    from robustlab.advmdp.algorithms.alg3 import _regression

    rng = np.random.default_rng(0)
    nA, n, d, ridge = 6, 4, 3, 0.7
    phi = rng.random((nA, d))
    samples = [(int(rng.integers(nA)), int(rng.integers(n))) for _ in range(50)]
    counts = np.zeros((nA, n))
    for i, t in samples:
        counts[i, t] += 1
    X = np.array([phi[i] for i, _ in samples])
    y_next = rng.random(n)
    y = np.array([y_next[t] for _, t in samples])
    Lam = ridge * np.eye(d) + X.T @ X
    w, Lam_inv = _regression(phi, counts, Lam, y_next)
    ridge_ls = np.linalg.solve(X.T @ X + ridge * np.eye(d), X.T @ y)
    assert np.allclose(w, ridge_ls, rtol=1e-12) and np.allclose(Lam_inv @ Lam, np.eye(d), atol=1e-12)
