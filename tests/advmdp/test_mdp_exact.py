"""Instances, loss sequences and exact DP against brute-force enumeration on tiny MDPs."""

import itertools

import numpy as np
import pytest

from robustlab.advmdp import exact
from robustlab.advmdp.losses import make_losses
from robustlab.advmdp.mdp import LinearMDP
from robustlab.errors import UserError


def tiny(seed=0, H=3, n=2, A=2, d=3):
    return LinearMDP.random(H, n, A, d, seed=seed)


def enumerate_paths(mdp, pi):
    """Every (state, action) path with its probability: the brute-force reference."""
    H, n, A = mdp.H, mdp.n_states, mdp.n_actions
    for path in itertools.product(range(n), range(A), repeat=H):
        states, actions = path[0::2], path[1::2]
        prob = mdp.rho[states[0]]
        for h in range(H):
            prob *= pi[h, states[h], actions[h]]
            if h < H - 1:
                prob *= mdp.P[h, states[h], actions[h], states[h + 1]]
        yield states, actions, prob


def random_policy(rng, H, n, A):
    return rng.dirichlet(np.ones(A), size=(H, n))


def test_random_instance_is_a_valid_linear_mdp():
    mdp = LinearMDP.random(5, 20, 5, 8, seed=3)
    assert mdp.P.shape == (4, 20, 5, 20)
    assert np.allclose(mdp.P.sum(-1), 1) and mdp.P.min() >= 0
    assert np.allclose(mdp.phi.sum(-1), 1) and mdp.phi.min() >= 0
    assert np.allclose(mdp.rho, 1 / 20)


def test_constructor_rejects_bad_inputs():
    mdp = tiny()
    bad_mu = mdp.mu.copy()
    bad_mu[0, 0, 0] += 0.5
    with pytest.raises(UserError, match="not stochastic"):
        LinearMDP(mdp.phi, bad_mu, mdp.rho)
    with pytest.raises(UserError, match="dimension mismatch"):
        LinearMDP(mdp.phi, mdp.mu[:, :2], mdp.rho)
    with pytest.raises(UserError, match="dimension mismatch"):
        LinearMDP(mdp.phi, mdp.mu, np.ones(5) / 5)
    with pytest.raises(UserError, match=r"\|\|phi"):
        LinearMDP(mdp.phi * 3, mdp.mu / 3, mdp.rho)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        mdp.check_theta(np.full((mdp.H, mdp.dim), 1.5))
    with pytest.raises(UserError, match="dimension mismatch"):
        mdp.check_theta(np.zeros((mdp.H, mdp.dim + 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_evaluation_and_occupancy_match_path_enumeration(seed):
    mdp = tiny(seed)
    rng = np.random.default_rng(seed)
    pi = random_policy(rng, mdp.H, mdp.n_states, mdp.n_actions)
    loss = mdp.loss_table(rng.random((mdp.H, mdp.dim)))
    total, occ = 0.0, np.zeros((mdp.H, mdp.n_states))
    for states, actions, prob in enumerate_paths(mdp, pi):
        total += prob * sum(loss[h, states[h], actions[h]] for h in range(mdp.H))
        for h in range(mdp.H):
            occ[h, states[h]] += prob
    assert exact.value(mdp, pi, loss) == pytest.approx(total, rel=1e-12)
    assert np.allclose(exact.occupancy(mdp, pi), occ)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_best_policy_in_hindsight_matches_all_deterministic_policies(seed):
    mdp = tiny(seed)
    rng = np.random.default_rng(10 + seed)
    cum = mdp.loss_table(rng.random((mdp.H, mdp.dim)) * 7)
    H, n, A = mdp.H, mdp.n_states, mdp.n_actions
    best = min(
        exact.value(mdp, np.eye(A)[np.array(acts).reshape(H, n)], cum)
        for acts in itertools.product(range(A), repeat=H * n)
    )
    actions, val = exact.best_policy_in_hindsight(mdp, cum)
    assert val == pytest.approx(best, rel=1e-12)
    assert exact.value(mdp, exact.deterministic_policy(actions, A), cum) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 5])
def test_linear_q_property_for_random_policies(seed):
    mdp = LinearMDP.random(4, 6, 3, 4, seed=seed)
    rng = np.random.default_rng(seed)
    theta = rng.random((mdp.H, mdp.dim))
    for _ in range(3):
        pi = random_policy(rng, mdp.H, mdp.n_states, mdp.n_actions)
        _, Q = exact.policy_evaluation(mdp, pi, mdp.loss_table(theta))
        w = exact.linear_q_weights(mdp, pi, theta)
        assert np.allclose(Q, np.einsum("hsad,hd->hsa", mdp.phi, w))
        assert np.all(np.linalg.norm(w, axis=-1) <= np.sqrt(mdp.dim) * mdp.H + 1e-9)


def test_signed_features_keep_the_model_and_the_values():
    mdp = LinearMDP.random(3, 4, 3, 4, seed=2)
    signed, M = mdp.with_signed_features(seed=1)
    assert signed.phi.min() < 0
    assert np.abs(np.linalg.norm(signed.phi, axis=-1)).max() <= 1 + 1e-9
    assert np.allclose(signed.P, mdp.P)
    theta = np.random.default_rng(0).random((mdp.H, mdp.dim))
    assert np.allclose(signed.loss_table(theta @ M.T), mdp.loss_table(theta))


def test_tabular_special_case():
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(3), size=(2, 3, 2))
    mdp = LinearMDP.tabular(P, np.array([1.0, 0, 0]))
    assert mdp.dim == 6
    assert np.allclose(mdp.P, P)
    assert np.allclose(mdp.phi.sum(-1), 1) and set(np.unique(mdp.phi)) == {0.0, 1.0}


def test_combination_lock_needs_exploration():
    H, A = 5, 3
    mdp = LinearMDP.combination_lock(H, A, seed=0)
    loss = mdp.loss_table(mdp.theta_mean)
    uniform = np.full((H, 2, A), 1 / A)
    q = exact.occupancy(mdp, uniform)
    assert q[H - 1, 0] == pytest.approx(A ** -(H - 1))
    assert exact.value(mdp, uniform, loss) == pytest.approx(H - A ** -(H - 1))
    _, best = exact.best_policy_in_hindsight(mdp, loss)
    assert best == pytest.approx(H - 1)


def test_loss_sequences():
    mdp = LinearMDP.random(3, 4, 3, 5, seed=0)
    K = 400
    st = make_losses("stochastic", mdp, K, seed=1)
    assert st.theta.shape == (K, 3, 5) and set(np.unique(st.theta)) <= {0.0, 1.0}
    assert np.abs(st.theta.mean(0) - mdp.theta_mean).max() < 0.2
    assert np.array_equal(st.theta, make_losses("stochastic", mdp, K, seed=1).theta)
    sw = make_losses("switching", mdp, K, seed=1)
    t1, t2 = sw.theta[0], sw.theta[-1]
    a1, _ = exact.best_policy_in_hindsight(mdp, mdp.loss_table(t1))
    a2, _ = exact.best_policy_in_hindsight(mdp, mdp.loss_table(t2))
    aa, _ = exact.best_policy_in_hindsight(mdp, mdp.loss_table(sw.theta.sum(0)))
    assert not np.array_equal(aa, a1) and not np.array_equal(aa, a2)
    nd = make_losses("needle", mdp, K, seed=1)
    assert nd.theta.shape == (K, 3, 5)
    assert make_losses("adaptive", mdp, K).adaptive
    with pytest.raises(UserError, match="unknown loss"):
        make_losses("nope", mdp, K)
    with pytest.raises(UserError, match="K must be"):
        make_losses("stochastic", mdp, 0)


def test_expected_regret_of_the_hindsight_policy_is_zero_and_uniform_positive():
    mdp = tiny(4)
    seq = make_losses("stochastic", mdp, 50, seed=0)
    actions, _ = exact.best_policy_in_hindsight(mdp, mdp.loss_table(seq.theta.sum(0)))
    best = exact.deterministic_policy(actions, mdp.n_actions)
    assert exact.expected_regret(mdp, np.broadcast_to(best, (50, *best.shape)), seq.theta) == pytest.approx(
        0, abs=1e-9
    )
    uni = np.full_like(best, 1 / mdp.n_actions)
    assert exact.expected_regret(mdp, np.broadcast_to(uni, (50, *uni.shape)), seq.theta) > 0
