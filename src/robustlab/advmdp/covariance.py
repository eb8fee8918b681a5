"""Covariance and its regularised inverse (brief 2.3), plus the transition simulator (brief 1.3).

Sigma_h(pi) = E_{s_h ~ q^pi_h}[ sum_a pi(a|s_h) phi(s_h,a) phi(s_h,a)^T ]. Three ways to get
Sigma_hat^+ ≈ (Sigma_h + gamma I)^-1:

1. :func:`exact_inverse` (the oracle; the M -> infinity limit of the others, used for scaling runs);
2. :func:`mgr`: Matrix Geometric Resampling from M simulator rollouts with step c;
3. :func:`plugin_inverse`: (Sigma_hat + gamma I)^-1 with Sigma_hat averaged over N rollouts, averaging the
   actions analytically because pi is known ([R]: the brief's reading of the paper's "alternative to MGR").
"""

from __future__ import annotations

import numpy as np

from robustlab.advmdp.exact import occupancy
from robustlab.advmdp.mdp import LinearMDP
from robustlab.errors import UserError


def check_gamma(gamma: float) -> float:
    if not np.isfinite(gamma) or gamma <= 0:
        raise UserError(f"gamma must be > 0, got {gamma}", "pass a positive regularisation gamma")
    return float(gamma)


def covariance(mdp: LinearMDP, pi: np.ndarray) -> np.ndarray:
    """Exact Sigma_h(pi) for every layer, ``(H, d, d)``."""
    q = occupancy(mdp, pi)
    w = q[:, :, None] * pi
    return np.einsum("hsa,hsai,hsaj->hij", w, mdp.phi, mdp.phi)


def exact_inverse(sigma: np.ndarray, gamma: float) -> np.ndarray:
    """(Sigma + gamma I)^-1 for a stack of covariances ``(..., d, d)``."""
    gamma = check_gamma(gamma)
    d = sigma.shape[-1]
    return np.linalg.inv(sigma + gamma * np.eye(d))


def mgr(features: np.ndarray, gamma: float, c: float = 0.5) -> np.ndarray:
    """Matrix Geometric Resampling (Neu & Olkhovskaya 2020) for each layer.

    ``features`` ``(M, H, d)``: phi(s_{i,h}, a_{i,h}) of M independent rollouts of pi. With
    Y_i = gamma I + phi_i phi_i^T and Z_i = (I - c Y_i) Z_{i-1}, Z_0 = I, returns
    Sigma_hat^+ = c I + c sum_{i=1}^M Z_i, whose expectation is
    (Sigma + gamma I)^-1 (I - (I - c (Sigma + gamma I))^(M+1)). Needs c <= 1/(1 + gamma).
    """
    gamma = check_gamma(gamma)
    if not 0 < c <= 1.0 / (1.0 + gamma):
        raise UserError(f"MGR step c={c} must lie in (0, 1/(1+gamma)]", "use c = 1/2")
    M, H, d = features.shape
    Z = np.broadcast_to(np.eye(d), (H, d, d)).copy()
    acc = np.broadcast_to(np.eye(d), (H, d, d)).copy()
    shrink = 1.0 - c * gamma
    for i in range(M):
        f = features[i]  # (H, d)
        fz = np.einsum("hd,hde->he", f, Z)  # phi^T Z
        Z = shrink * Z - c * f[:, :, None] * fz[:, None, :]
        acc += Z
    return c * acc


def plugin_covariance(mdp: LinearMDP, pi: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Sigma_hat_h = (1/N) sum_i sum_a pi(a|s_{i,h}) phi phi^T from visited states ``(N, H)``."""
    N, H = states.shape
    out = np.empty((H, mdp.dim, mdp.dim))
    for h in range(H):
        counts = np.bincount(states[:, h], minlength=mdp.n_states) / N
        w = counts[:, None] * pi[h]
        out[h] = np.einsum("sa,sai,saj->ij", w, mdp.phi[h], mdp.phi[h])
    return out


def plugin_inverse(mdp: LinearMDP, pi: np.ndarray, states: np.ndarray, gamma: float) -> np.ndarray:
    """(Sigma_hat + gamma I)^-1 with Sigma_hat from N rollouts' states (see :func:`plugin_covariance`).

    Matrix Chernoff: 1/2 (Sigma + gamma I) <= Sigma_hat + gamma I <= 3/2 (Sigma + gamma I) w.p. >= 1 - delta
    once N >~ (1/gamma) log(d / delta)."""
    return exact_inverse(plugin_covariance(mdp, pi, states), gamma)


class Simulator:
    """A transition simulator: draws s' ~ P_h(.|s,a), never reveals losses (brief 1.3).

    ``calls`` counts sampled transitions (one per s' draw, including the draw of s_1 from rho);
    ``rollouts`` counts trajectories. Rollouts may start at layer 1 or at any (layer, state, action).
    """

    def __init__(self, mdp: LinearMDP, rng: np.random.Generator) -> None:
        self.mdp = mdp
        self.rng = rng
        self.calls = 0
        self.rollouts = 0
        self._Pcum = np.cumsum(mdp.P, axis=-1)
        self._rho_cum = np.cumsum(mdp.rho)

    def _next(self, h: int, s: np.ndarray, a: np.ndarray) -> np.ndarray:
        u = self.rng.random(s.shape)
        self.calls += s.size
        return np.minimum((u[:, None] > self._Pcum[h, s, a]).sum(-1), self.mdp.n_states - 1)

    def _act(self, pi_h: np.ndarray, s: np.ndarray) -> np.ndarray:
        u = self.rng.random(s.shape)
        return np.minimum((u[:, None] > np.cumsum(pi_h[s], -1)).sum(-1), self.mdp.n_actions - 1)

    def rollout(self, pi: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """m trajectories of pi from s_1 ~ rho: states and actions, each ``(m, H)``."""
        H = self.mdp.H
        S = np.empty((m, H), dtype=int)
        Aa = np.empty((m, H), dtype=int)
        u = self.rng.random(m)
        self.calls += m
        self.rollouts += m
        S[:, 0] = np.minimum((u[:, None] > self._rho_cum).sum(-1), self.mdp.n_states - 1)
        for h in range(H):
            Aa[:, h] = self._act(pi[h], S[:, h])
            if h < H - 1:
                S[:, h + 1] = self._next(h, S[:, h], Aa[:, h])
        return S, Aa

    def rollout_from(
        self, pi: np.ndarray, h0: int, s: np.ndarray, a: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Trajectories that start at (layer h0, s, a) and then follow pi: ``(m, H - h0)`` each."""
        H = self.mdp.H
        m = s.shape[0]
        S = np.empty((m, H - h0), dtype=int)
        Aa = np.empty((m, H - h0), dtype=int)
        S[:, 0], Aa[:, 0] = s, a
        self.rollouts += m
        for j, h in enumerate(range(h0, H - 1)):
            S[:, j + 1] = self._next(h, S[:, j], Aa[:, j])
            Aa[:, j + 1] = self._act(pi[h + 1], S[:, j + 1])
        return S, Aa

    def features(self, S: np.ndarray, Aa: np.ndarray, h0: int = 0) -> np.ndarray:
        """phi(s_h, a_h) along trajectories ``(m, L)`` starting at layer h0 -> ``(m, L, d)``."""
        L = S.shape[1]
        return self.mdp.phi[np.arange(h0, h0 + L)[None, :], S, Aa]
