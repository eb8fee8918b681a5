"""Exact dynamic programming on a finite layered MDP (brief 7.5): values, Q, occupancies, the comparator.

Policies are arrays ``pi`` of shape ``(H, n, A)`` (rows are distributions); loss tables have shape
``(H, n, A)``. Everything here is plain backward / forward recursion, independent of the learners.
"""

from __future__ import annotations

import numpy as np

from robustlab.advmdp.mdp import LinearMDP


def policy_evaluation(mdp: LinearMDP, pi: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V^pi (``(H, n)``) and Q^pi (``(H, n, A)``) of a policy under one loss table, by backward DP."""
    H, n, _, _ = mdp.phi.shape
    V = np.zeros((H, n))
    Q = np.zeros(loss.shape)
    nxt = np.zeros(n)
    for h in reversed(range(H)):
        Q[h] = loss[h] + (mdp.P[h] @ nxt if h < H - 1 else 0.0)
        V[h] = (pi[h] * Q[h]).sum(-1)
        nxt = V[h]
    return V, Q


def value(mdp: LinearMDP, pi: np.ndarray, loss: np.ndarray) -> float:
    """V^pi(s_1) = E_{s_1 ~ rho} V^pi_1(s_1): the expected total loss of one episode."""
    return float(mdp.rho @ policy_evaluation(mdp, pi, loss)[0][0])


def occupancy(mdp: LinearMDP, pi: np.ndarray) -> np.ndarray:
    """State occupancy q^pi_h(s) = Pr[s_h = s] (``(H, n)``), by a forward pass."""
    H, n = mdp.H, mdp.n_states
    q = np.empty((H, n))
    q[0] = mdp.rho
    for h in range(H - 1):
        q[h + 1] = np.einsum("s,sa,sat->t", q[h], pi[h], mdp.P[h])
    return q


def best_policy_in_hindsight(mdp: LinearMDP, losses: np.ndarray) -> tuple[np.ndarray, float]:
    """argmin_pi V^pi(s_1; Lambda) for a cumulative loss table ``Lambda`` ``(H, n, A)``.

    Returns the optimal deterministic Markov policy as actions ``(H, n)`` and its value. Because the
    transitions are fixed, min_pi sum_k V^pi_k(s_1) = min_pi V^pi(s_1; sum_k l_k) (brief 1.5)."""
    H, n = mdp.H, mdp.n_states
    actions = np.zeros((H, n), dtype=int)
    nxt = np.zeros(n)
    for h in reversed(range(H)):
        Q = losses[h] + (mdp.P[h] @ nxt if h < H - 1 else 0.0)
        actions[h] = Q.argmin(-1)
        nxt = Q.min(-1)
    return actions, float(mdp.rho @ nxt)


def deterministic_policy(actions: np.ndarray, n_actions: int) -> np.ndarray:
    """One-hot ``(H, n, A)`` policy from actions ``(H, n)``."""
    return np.eye(n_actions)[actions]


def linear_q_weights(mdp: LinearMDP, pi: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """theta^pi_h = theta_h + mu_h V^pi_{h+1} (``(H, d)``), so that Q^pi_h(s,a) = phi_h(s,a)^T theta^pi_h."""
    V, _ = policy_evaluation(mdp, pi, mdp.loss_table(theta))
    out = np.array(theta, dtype=float, copy=True)
    for h in range(mdp.H - 1):
        out[h] += mdp.mu[h] @ V[h + 1]
    return out


def comparator_value(mdp: LinearMDP, theta_sum: np.ndarray) -> float:
    """min_pi sum_k V^pi_k(s_1) for the summed loss weights ``theta_sum = sum_k theta_k`` ``(H, d)``."""
    return best_policy_in_hindsight(mdp, mdp.loss_table(theta_sum))[1]


def expected_regret(mdp: LinearMDP, policies: np.ndarray, thetas: np.ndarray) -> float:
    """Pseudo-regret sum_k V^{pi_k}_k(s_1) - min_pi sum_k V^pi_k(s_1) of a fixed sequence of policies.

    ``policies`` ``(K, H, n, A)``, ``thetas`` ``(K, H, d)``."""
    tables = mdp.loss_table(thetas)
    learner = sum(value(mdp, pi, t) for pi, t in zip(policies, tables, strict=True))
    return learner - comparator_value(mdp, np.asarray(thetas).sum(0))
