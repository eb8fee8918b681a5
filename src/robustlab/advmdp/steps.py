"""The per-step functions of one episode of policy optimisation, for one learner seed (the readable core).

Every function is pure (arrays in, arrays out) and states the formula it computes, with its place in the
brief ``shared/papers/advmdp.md`` (the paper's body could not be retrieved, so items marked [R] are the
brief's reconstructions, see its section 0). Shapes: ``phi (H, n, A, d)``, ``mu (H-1, d, n)``,
``rho (n,)``, policies and cumulative losses ``(H, n, A)``, loss weights ``theta (H, d)``.

The algorithms are composed from these functions in :mod:`robustlab.advmdp.readable`, one screen each;
the batched engines (:mod:`robustlab.advmdp.algorithms.engine`, :mod:`robustlab.advmdp.algorithms.fast`)
are tested against that composition.
"""

from __future__ import annotations

import numpy as np

from robustlab.advmdp.covariance import mgr, plugin_inverse  # noqa: F401  (the simulator-mode inverses)
from robustlab.advmdp.ftrl import hedge, log_barrier
from robustlab.advmdp.mdp import LinearMDP

# ----------------------------------------------------------------------------- policy


def policy(C: np.ndarray, eta: float, regularizer: str) -> np.ndarray:
    """pi_k(.|s) = argmin_{p in simplex} <p, C_k(s, .)> + Psi(p) at every state (brief 2.1).

    ``hedge``: Psi = (1/eta) sum p ln p, so pi ∝ exp(-eta C) (Alg 2, Luo et al. 2021b, full information).
    ``log_barrier``: Psi = (1/eta) sum ln(1/p), solved on its KKT multiplier (Alg 1, brief 3.4).
    ``uniform``: the uniform policy (reference). C is the cumulative FTRL loss sum_{tau<k} (Qhat - B)."""
    if regularizer == "hedge":
        return hedge(C, eta)
    if regularizer == "log_barrier":
        return log_barrier(C, eta, tol=1e-13)
    return np.full(C.shape, 1.0 / C.shape[-1])


# ----------------------------------------------------------------------------- occupancy and covariance


def occupancy(mdp: LinearMDP, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy of (s, a) at every layer, ``w_h(s,a) = q_h(s) pi(a|s)`` ``(H, n, A)``, and the expected
    feature ``phibar_h = sum_{s,a} w_h(s,a) phi_h(s,a)`` ``(H, d)`` (brief 7.5, forward pass).

    The forward step uses the low-rank form q_{h+1} = mu_h^T phibar_h (brief 7.1), exact for a linear MDP."""
    H, n, A, d = mdp.phi.shape
    w = np.empty((H, n, A))
    phibar = np.empty((H, d))
    q = mdp.rho
    for h in range(H):
        w[h] = q[:, None] * pi[h]
        phibar[h] = np.einsum("sa,sad->d", w[h], mdp.phi[h])
        if h < H - 1:
            q = phibar[h] @ mdp.mu[h]
    return w, phibar


def covariance_inverse(mdp: LinearMDP, w: np.ndarray, gamma: float) -> np.ndarray:
    """Sigma_hat^+_{k,h} = (Sigma_{k,h} + gamma I)^-1 with the exact covariance
    Sigma_{k,h} = E_{s_h ~ q_h} sum_a pi(a|s_h) phi phi^T (brief 1.3 (i), 2.2): the oracle mode, the
    M, N -> infinity limit of MGR (:func:`mgr`) and of the plug-in inverse (:func:`plugin_inverse`)."""
    sigma = np.einsum("hsa,hsai,hsaj->hij", w, mdp.phi, mdp.phi)
    return np.linalg.inv(sigma + gamma * np.eye(mdp.dim))


# ----------------------------------------------------------------------------- one real trajectory


def sample_trajectory(mdp: LinearMDP, pi: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Play pi_k once (bandit feedback, brief 1.1) by inverse-CDF sampling from the 2H uniforms ``u``:
    u[0] draws s_1 ~ rho, u[2h+1] draws a_h ~ pi(.|s_h), u[2h+2] draws s_{h+1} ~ P_h(.|s_h, a_h).
    Returns the visited states and actions, each ``(H,)``. (Every engine consumes the same uniforms.)"""
    H, n = mdp.H, mdp.n_states
    S = np.empty(H, dtype=np.intp)
    Aa = np.empty(H, dtype=np.intp)
    s = min(int(np.searchsorted(np.cumsum(mdp.rho), u[0], side="right")), n - 1)
    for h in range(H):
        S[h] = s
        cum = np.cumsum(pi[h, s])
        cum[-1] = 2.0  # uniforms are < 1: never run past the last action
        Aa[h] = int((u[2 * h + 1] > cum).sum())
        if h < H - 1:
            cum = np.cumsum(mdp.P[h, s, Aa[h]])
            cum[-1] = 2.0
            s = int((u[2 * h + 2] > cum).sum())
    return S, Aa


def suffix_losses(ell: np.ndarray) -> np.ndarray:
    """L_{k,h} = sum_{h' >= h} l_k(s_{k,h'}, a_{k,h'}) (brief 1.6), in [0, H - h + 1]."""
    return np.cumsum(ell[::-1])[::-1]


# ----------------------------------------------------------------------------- loss estimators


def estimator_inner(mdp: LinearMDP, Sp: np.ndarray, S: np.ndarray, Aa: np.ndarray) -> np.ndarray:
    """x_{k,h}(s,a) = phi(s,a)^T Sigma_hat^+_{k,h} phi_{k,h} at every (s, a) ``(H, n, A)`` (brief 4.1)."""
    H = mdp.H
    phi_k = mdp.phi[np.arange(H), S, Aa]  # (H, d)
    return np.einsum("hsai,hij,hj->hsa", mdp.phi, Sp, phi_k)


def plain_estimator(x: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Qhat_k(s,a) = phi(s,a)^T theta_hat_{k,h}, theta_hat = Sigma_hat^+ phi_{k,h} L_{k,h}, i.e.
    Qhat = x L (brief 2.2; Luo et al. 2021b's estimator, used by Alg 1). Unbiased for
    phi^T (Sigma + gamma I)^-1 Sigma theta^pi; its magnitude reaches H/gamma with either sign."""
    return x * L[:, None, None]


def negative_part_mean(mdp: LinearMDP, Sp: np.ndarray, w: np.ndarray) -> np.ndarray:
    """E[x_-](s,a) = E_{(s',a') ~ w_h} (phi(s,a)^T Sigma_hat^+ phi(s',a'))_- with (y)_- = max(-y, 0),
    exactly from the (nA x nA) Gram matrix of each layer (brief 4.2, oracle mode) ``(H, n, A)``."""
    G = np.einsum("hsai,hij,htbj->hsatb", mdp.phi, Sp, mdp.phi)
    return np.einsum("hsatb,htb->hsa", np.maximum(-G, 0.0), w)


def mr_unbiased_estimator(x: np.ndarray, L: np.ndarray, eneg: np.ndarray) -> np.ndarray:
    """Alg 2's magnitude-reduced estimator, MR-unbiased variant [R] (brief 4.2):
    Qtilde = x L + H_h (x_- - E[x_-]) = x_+ L + x_- (H_h - L) - H_h E[x_-], with H_h = H - h + 1 >= L.

    Same mean as :func:`plain_estimator`; Qtilde >= -H_h E[x_-] on every trajectory (negative magnitude
    H/sqrt(gamma) instead of H/gamma)."""
    Hh = (x.shape[0] - np.arange(x.shape[0]))[:, None, None].astype(float)
    return x * L[:, None, None] + Hh * (np.maximum(-x, 0.0) - eneg)


def mr_clip_estimator(Qhat: np.ndarray, eta: float) -> np.ndarray:
    """Alg 2's MR-clip variant [R] (brief 4.2): Qtilde = max(Qhat, -1/(2 eta)); one-sided bias
    0 <= E Qtilde - E Qhat <= 2 eta E Qhat^2, paid by the bonus."""
    return np.maximum(Qhat, -1.0 / (2.0 * eta))


# ----------------------------------------------------------------------------- dilated bonus


def bonus(mdp: LinearMDP, Sp: np.ndarray, pi: np.ndarray, beta: float) -> np.ndarray:
    """b_k(s,a) = beta (||phi(s,a)||^2_{Sigma_hat^+} + sum_a' pi(a'|s) ||phi(s,a')||^2_{Sigma_hat^+})
    (brief 2.4, Luo et al. 2021b's bonus as used by Alg 1 and Alg 2 [R])."""
    norm2 = np.einsum("hsai,hij,hsaj->hsa", mdp.phi, Sp, mdp.phi)
    return beta * (norm2 + (pi * norm2).sum(-1, keepdims=True))


def dilated_bonus(mdp: LinearMDP, b: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """The dilated Bellman equation (brief 2.4, Luo et al. 2021b):
    B(s,a) = b(s,a) + (1 + 1/H) E_{s' ~ P(.|s,a), a' ~ pi(.|s')} B(s',a'), B = 0 after layer H;
    solved by a backward pass."""
    H = mdp.H
    B = np.array(b, copy=True)
    for h in reversed(range(H - 1)):
        nxt = (pi[h + 1] * B[h + 1]).sum(-1)  # (n,)
        B[h] += (1.0 + 1.0 / H) * (mdp.P[h] @ nxt)
    return B


# ----------------------------------------------------------------------------- full information


def exact_q(mdp: LinearMDP, pi: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Q^{pi_k}_k(s,a) = phi(s,a)^T theta^pi_{k,h}, theta^pi_h = theta_h + mu_h V^pi_{h+1} (brief 1.4):
    the feedback of full-information policy optimisation (brief 6.3) and of the eta-matched controls."""
    H = mdp.H
    Q = np.empty(pi.shape)
    V = np.zeros(mdp.n_states)
    for h in reversed(range(H)):
        wh = theta[h] + (mdp.mu[h] @ V if h < H - 1 else 0.0)
        Q[h] = mdp.phi[h] @ wh
        V = (pi[h] * Q[h]).sum(-1)
    return Q


def expected_loss(phibar: np.ndarray, theta: np.ndarray) -> float:
    """V^{pi_k}_k(s_1) = sum_h <phibar_h, theta_{k,h}> (measurement only; the learner never sees it)."""
    return float(np.einsum("hd,hd->", phibar, theta))


# ----------------------------------------------------------------------------- FTRL update


def ftrl_update(C: np.ndarray, Qtilde: np.ndarray, B: np.ndarray | None = None) -> np.ndarray:
    """C_{k+1} = C_k + Qtilde_k - B_k: the cumulative loss that every state's FTRL instance minimises
    next episode (brief 2.1, 3.2 step 6)."""
    return C + Qtilde - (0.0 if B is None else B)
