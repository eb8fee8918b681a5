"""The per-step functions against exact expectations, computed by enumerating every trajectory of a
small instance (H=3, n=3, A=2: (nA)^H = 216 trajectories) under a fixed stochastic policy."""

import itertools

import numpy as np
import pytest

from robustlab.advmdp import exact, steps
from robustlab.advmdp.covariance import covariance, exact_inverse
from robustlab.advmdp.mdp import LinearMDP

GAMMA = 0.05


@pytest.fixture(scope="module")
def world():
    mdp = LinearMDP.random(3, 3, 2, 3, seed=5)
    rng = np.random.default_rng(0)
    pi = steps.hedge(rng.normal(size=(3, 3, 2)) * 2.0, 1.0)
    theta = rng.random((3, 3))
    return mdp, pi, theta


def trajectories(mdp, pi):
    """Every (states, actions) path with its probability."""
    H, n, A, _ = mdp.phi.shape
    for path in itertools.product(range(n * A), repeat=H):
        S = np.array([p // A for p in path])
        Aa = np.array([p % A for p in path])
        prob = mdp.rho[S[0]]
        for h in range(H):
            prob *= pi[h, S[h], Aa[h]]
            if h < H - 1:
                prob *= mdp.P[h, S[h], Aa[h], S[h + 1]]
        yield prob, S, Aa


def enumerate_estimators(mdp, pi, theta, gamma=GAMMA, eta=None):
    """Exact E[plain], E[MR-unbiased], E[MR-clip], E[plain^2] over trajectories, plus the per-trajectory
    minimum of the MR-unbiased estimator and E[x_-]."""
    w, _ = steps.occupancy(mdp, pi)
    Sp = steps.covariance_inverse(mdp, w, gamma)
    eneg = steps.negative_part_mean(mdp, Sp, w)
    out = {k: np.zeros(pi.shape) for k in ("plain", "mr", "clip", "plain2", "xneg")}
    out["mr_min"] = np.full(pi.shape, np.inf)
    out["plain_min"] = np.full(pi.shape, np.inf)
    total = 0.0
    for prob, S, Aa in trajectories(mdp, pi):
        ell = np.einsum("hd,hd->h", mdp.phi[np.arange(mdp.H), S, Aa], theta)
        L = steps.suffix_losses(ell)
        x = steps.estimator_inner(mdp, Sp, S, Aa)
        plain = steps.plain_estimator(x, L)
        mr = steps.mr_unbiased_estimator(x, L, eneg)
        out["plain"] += prob * plain
        out["plain2"] += prob * plain**2
        out["mr"] += prob * mr
        out["xneg"] += prob * np.maximum(-x, 0.0)
        if eta is not None:
            out["clip"] += prob * steps.mr_clip_estimator(plain, eta)
        out["mr_min"] = np.minimum(out["mr_min"], mr)
        out["plain_min"] = np.minimum(out["plain_min"], plain)
        total += prob
    assert total == pytest.approx(1.0, abs=1e-12)
    return out, Sp, eneg


def test_occupancy_and_covariance_match_exact_dp(world):
    mdp, pi, _ = world
    w, phibar = steps.occupancy(mdp, pi)
    q = exact.occupancy(mdp, pi)
    assert np.allclose(w, q[:, :, None] * pi, atol=1e-14)
    assert np.allclose(phibar, np.einsum("hsa,hsad->hd", w, mdp.phi), atol=1e-14)
    assert np.allclose(
        steps.covariance_inverse(mdp, w, GAMMA), exact_inverse(covariance(mdp, pi), GAMMA), rtol=1e-12
    )


def test_plain_estimator_mean_is_the_regularised_q_by_enumeration(world):
    """E[Qhat(s,a)] = phi^T (Sigma + gamma I)^-1 Sigma theta^pi_h (brief 2.2), exactly."""
    mdp, pi, theta = world
    out, Sp, _ = enumerate_estimators(mdp, pi, theta)
    th_pi = exact.linear_q_weights(mdp, pi, theta)
    sigma = covariance(mdp, pi)
    expect = np.einsum("hsai,hij,hjk,hk->hsa", mdp.phi, Sp, sigma, th_pi)
    assert np.allclose(out["plain"], expect, rtol=1e-11, atol=1e-12)
    # and gamma -> 0 recovers Q^pi itself (the instance's Sigma_h is full rank)
    out0, _, _ = enumerate_estimators(mdp, pi, theta, gamma=1e-9)
    _, Q = exact.policy_evaluation(mdp, pi, mdp.loss_table(theta))
    assert np.allclose(out0["plain"], Q, atol=1e-6)


def test_mr_unbiased_mean_equals_plain_mean_by_enumeration(world):
    mdp, pi, theta = world
    out, _, _ = enumerate_estimators(mdp, pi, theta)
    assert np.allclose(out["mr"], out["plain"], rtol=1e-11, atol=1e-12)
    assert not np.allclose(out["mr_min"], out["plain"])  # the two estimators differ path by path


def test_negative_part_mean_is_the_expectation_of_x_minus(world):
    mdp, pi, theta = world
    out, _, eneg = enumerate_estimators(mdp, pi, theta)
    assert np.allclose(eneg, out["xneg"], rtol=1e-11, atol=1e-13)
    assert eneg.max() > 0  # the instance does produce negative x


def test_mr_unbiased_lower_bound_holds_on_every_trajectory(world):
    """Qtilde >= -H_h E[x_-] deterministically (brief 4.2), while the plain estimator goes below it."""
    mdp, pi, theta = world
    out, _, eneg = enumerate_estimators(mdp, pi, theta)
    Hh = (mdp.H - np.arange(mdp.H))[:, None, None]
    bound = -Hh * eneg
    assert np.all(out["mr_min"] >= bound - 1e-12)
    assert np.any(out["plain_min"] < bound - 1e-3)


def test_mr_clip_bias_is_one_sided_and_bounded_by_enumeration(world):
    """0 <= E Qtilde - E Qhat <= 2 eta E Qhat^2 for Qtilde = max(Qhat, -1/(2 eta)) (brief 4.2)."""
    mdp, pi, theta = world
    out, _, _ = enumerate_estimators(mdp, pi, theta)
    eta = 1.0 / -out["plain_min"].min()  # clip at half the most negative value: active on some paths
    out, _, _ = enumerate_estimators(mdp, pi, theta, eta=eta)
    bias = out["clip"] - out["plain"]
    assert np.all(bias >= -1e-12)
    assert np.all(bias <= 2 * eta * out["plain2"] + 1e-12)
    assert bias.max() > 1e-6  # the clip is active somewhere at this eta


def test_dilated_bonus_equals_brute_force_over_trajectories(world):
    """B(s,a) = E[sum_j (1 + 1/H)^j b(s_{h+j}, a_{h+j}) | s_h = s, a_h = a] over every continuation."""
    mdp, pi, _ = world
    H, n, A, _ = mdp.phi.shape
    w, _ = steps.occupancy(mdp, pi)
    b = steps.bonus(mdp, steps.covariance_inverse(mdp, w, GAMMA), pi, beta=0.7)
    B = steps.dilated_bonus(mdp, b, pi)
    brute = np.zeros_like(B)
    for h, s, a in itertools.product(range(H), range(n), range(A)):
        for cont in itertools.product(range(n * A), repeat=H - 1 - h):
            prob, val = 1.0, b[h, s, a]
            ps, pa = s, a
            for j, node in enumerate(cont, start=1):
                t, c = divmod(node, A)
                prob *= mdp.P[h + j - 1, ps, pa, t] * pi[h + j, t, c]
                val += (1 + 1 / H) ** j * b[h + j, t, c]
                ps, pa = t, c
            brute[h, s, a] += prob * val
    assert np.allclose(B, brute, rtol=1e-12)


def test_bonus_formula_by_hand(world):
    mdp, pi, _ = world
    w, _ = steps.occupancy(mdp, pi)
    Sp = steps.covariance_inverse(mdp, w, GAMMA)
    b = steps.bonus(mdp, Sp, pi, beta=2.0)
    h, s = 1, 2
    norms = [mdp.phi[h, s, a] @ Sp[h] @ mdp.phi[h, s, a] for a in range(mdp.n_actions)]
    for a in range(mdp.n_actions):
        assert b[h, s, a] == pytest.approx(2.0 * (norms[a] + np.dot(pi[h, s], norms)), rel=1e-12)


def test_exact_q_is_policy_evaluation(world):
    mdp, pi, theta = world
    _, Q = exact.policy_evaluation(mdp, pi, mdp.loss_table(theta))
    assert np.allclose(steps.exact_q(mdp, pi, theta), Q, rtol=1e-12)


def test_trajectory_sampling_frequencies_match_the_policy(world):
    """sample_trajectory with i.i.d. uniforms draws paths with their exact probabilities."""
    mdp, pi, _ = world
    rng = np.random.default_rng(1)
    counts: dict = {}
    N = 20000
    for u in rng.random((N, 2 * mdp.H)):
        S, Aa = steps.sample_trajectory(mdp, pi, u)
        key = (*S, *Aa)
        counts[key] = counts.get(key, 0) + 1
    for prob, S, Aa in trajectories(mdp, pi):
        f = counts.get((*S, *Aa), 0) / N
        assert abs(f - prob) <= 5 * np.sqrt(prob * (1 - prob) / N) + 1e-4
