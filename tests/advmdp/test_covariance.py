"""Covariance estimators: exact oracle by enumeration, MGR against its known expectation, the plug-in
estimator against its spectral guarantee, and the simulator against exact occupancies."""

import numpy as np
import pytest

from robustlab.advmdp import exact
from robustlab.advmdp.covariance import (
    Simulator,
    covariance,
    exact_inverse,
    mgr,
    plugin_covariance,
    plugin_inverse,
)
from robustlab.advmdp.mdp import LinearMDP
from robustlab.errors import UserError


def setup(seed=0):
    mdp = LinearMDP.random(3, 4, 3, 4, seed=seed)
    pi = np.random.default_rng(seed).dirichlet(np.ones(3), size=(3, 4))
    return mdp, pi


def test_exact_covariance_by_enumeration():
    mdp, pi = setup()
    q = exact.occupancy(mdp, pi)
    ref = np.zeros((mdp.H, mdp.dim, mdp.dim))
    for h in range(mdp.H):
        for s in range(mdp.n_states):
            for a in range(mdp.n_actions):
                f = mdp.phi[h, s, a]
                ref[h] += q[h, s] * pi[h, s, a] * np.outer(f, f)
    assert np.allclose(covariance(mdp, pi), ref)
    inv = exact_inverse(ref, 0.1)
    assert np.allclose(inv @ (ref + 0.1 * np.eye(mdp.dim)), np.eye(mdp.dim))
    with pytest.raises(UserError, match="gamma"):
        exact_inverse(ref, 0.0)
    with pytest.raises(UserError, match="gamma"):
        exact_inverse(ref, -1.0)


def test_simulator_matches_occupancy_and_counts_calls():
    mdp, pi = setup(1)
    sim = Simulator(mdp, np.random.default_rng(0))
    m = 40000
    S, _ = sim.rollout(pi, m)
    assert sim.calls == m * mdp.H and sim.rollouts == m
    q = exact.occupancy(mdp, pi)
    for h in range(mdp.H):
        freq = np.bincount(S[:, h], minlength=mdp.n_states) / m
        se = np.sqrt(q[h] * (1 - q[h]) / m)
        assert np.all(np.abs(freq - q[h]) <= 5 * se + 1e-12)


def test_mgr_expectation_matches_closed_form():
    mdp, pi = setup(2)
    sigma = covariance(mdp, pi)
    gamma, c, M, R = 0.2, 0.5, 12, 3000
    sim = Simulator(mdp, np.random.default_rng(5))
    draws = []
    for _ in range(R):
        S, Aa = sim.rollout(pi, M)
        draws.append(mgr(sim.features(S, Aa), gamma, c))
    draws = np.array(draws)
    mean, se = draws.mean(0), draws.std(0) / np.sqrt(R)
    eye = np.eye(mdp.dim)
    for h in range(mdp.H):
        reg = sigma[h] + gamma * eye
        expected = np.linalg.inv(reg) @ (eye - np.linalg.matrix_power(eye - c * reg, M + 1))
        assert np.all(np.abs(mean[h] - expected) <= 5 * se[h] + 1e-9)
    with pytest.raises(UserError, match="MGR step"):
        mgr(np.zeros((2, 1, 2)), 0.5, c=0.9)


def test_plugin_inverse_spectral_guarantee():
    """1/2 (Sigma + gamma I) <= Sigma_hat + gamma I <= 3/2 (Sigma + gamma I) with high probability
    once N >~ (1/gamma) log(d/delta) (matrix Chernoff); checked on a known Sigma."""
    mdp, pi = setup(3)
    sigma = covariance(mdp, pi)
    gamma, delta = 0.05, 0.05
    N = int(np.ceil(8 / gamma * np.log(2 * mdp.dim / delta)))
    sim = Simulator(mdp, np.random.default_rng(7))
    ok, trials = 0, 100
    for _ in range(trials):
        S, _ = sim.rollout(pi, N)
        est = plugin_covariance(mdp, pi, S)
        good = True
        for h in range(mdp.H):
            reg = sigma[h] + gamma * np.eye(mdp.dim)
            w = np.linalg.eigvalsh(
                np.linalg.solve(
                    np.linalg.cholesky(reg),
                    np.linalg.solve(np.linalg.cholesky(reg), est[h] + gamma * np.eye(mdp.dim)).T,
                )
            )
            good &= bool(w.min() >= 0.5 and w.max() <= 1.5)
        ok += good
    assert ok >= (1 - delta) * trials
    # and the inverse is the inverse of the regularised estimate
    S, _ = sim.rollout(pi, N)
    inv = plugin_inverse(mdp, pi, S, gamma)
    assert np.allclose(inv @ (plugin_covariance(mdp, pi, S) + gamma * np.eye(mdp.dim)), np.eye(mdp.dim))
