"""FTRL over the probability simplex, vectorised over any leading shape (one instance per state).

``hedge``: negative-entropy regulariser, p ∝ exp(-eta C). ``log_barrier``: Psi(p) = (1/eta) sum_a ln(1/p_a),
solved through its KKT conditions p_a = 1 / (eta (C_a + lambda)) with the multiplier lambda found by a
monotone Newton iteration (brief 3.4). Both accept arbitrary-sign, huge-magnitude cumulative losses.
"""

from __future__ import annotations

import numpy as np


def row_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis. For the short rows here (one entry per action) a matrix-vector product is
    several times faster than ``x.sum(-1)``, whose reduction loop restarts for every row."""
    return x @ np.ones(x.shape[-1])


def row_min(x: np.ndarray) -> np.ndarray:
    """Minimum over the last axis; for short rows an elementwise minimum over the columns (faster than
    ``x.min(-1)`` for the same reason as :func:`row_sum`)."""
    if x.shape[-1] > 16:
        return x.min(-1)
    m = np.array(x[..., 0], copy=True)
    for a in range(1, x.shape[-1]):
        np.minimum(m, x[..., a], out=m)
    return m


def hedge(cumulative_losses: np.ndarray, eta: float) -> np.ndarray:
    """argmin_p <p, C> + (1/eta) sum p ln p over the simplex (last axis): a softmax of -eta C."""
    C = np.asarray(cumulative_losses, dtype=float)
    z = C - row_min(C)[..., None]
    z *= -eta
    np.exp(z, out=z)
    z /= row_sum(z)[..., None]
    return z


def log_barrier(
    cumulative_losses: np.ndarray,
    eta: float,
    tol: float = 1e-12,
    max_iter: int = 100,
    t0: np.ndarray | None = None,
    return_multiplier: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """argmin_p <p, C> + (1/eta) sum_a ln(1/p_a) over the simplex (last axis).

    With x = C - min C >= 0 and t = eta * lambda, p_a = 1 / (eta x_a + t) where t in [1, A] solves
    g(t) = sum_a 1/(eta x_a + t) = 1. g is convex and decreasing, so Newton from t0 = 1 (where g >= 1)
    increases monotonically to the root; it stops when max |g - 1| <= tol (quadratic convergence).

    ``t0`` warm-starts the iteration (e.g. the previous episode's multiplier, shape ``(..., 1)``). A start
    right of the root is safe: by convexity the first Newton step lands left of the root, and it is
    clipped at 1 (where g >= 1), after which the iteration is monotone again.
    ``return_multiplier`` also returns t (to warm-start the next call).
    """
    C = np.asarray(cumulative_losses, dtype=float)
    u = C - row_min(C)[..., None]
    u *= eta
    t = np.ones((*u.shape[:-1], 1)) if t0 is None else np.array(t0, dtype=float, copy=True)
    for _ in range(max_iter):
        r = u + t
        np.reciprocal(r, out=r)
        g = row_sum(r)[..., None]
        if np.max(np.abs(g - 1.0)) <= tol:
            break
        r *= r
        t += (g - 1.0) / row_sum(r)[..., None]
        np.maximum(t, 1.0, out=t)
    p = u + t
    np.reciprocal(p, out=p)
    p /= row_sum(p)[..., None]
    return (p, t) if return_multiplier else p


def log_barrier_objective(p: np.ndarray, C: np.ndarray, eta: float) -> float:
    """<p, C> + (1/eta) sum_a ln(1/p_a): the FTRL objective the solver minimises (for checks)."""
    return float(np.dot(p, C) - np.log(p).sum() / eta)


def log_barrier_bregman(p: np.ndarray, q: np.ndarray, eta: float) -> float:
    """D_Psi(p, q) = (1/eta) sum_a (p_a/q_a - 1 - ln(p_a/q_a)) for Psi = (1/eta) sum ln(1/p)."""
    r = np.asarray(p) / np.asarray(q)
    return float((r - 1 - np.log(r)).sum() / eta)


def stability_bound(p: np.ndarray, loss: np.ndarray, eta: float) -> float:
    """The refined log-barrier stability bound of brief 3.1: 2 eta sum_a p_a loss_a^2 (any real loss)."""
    return float(2 * eta * np.sum(p * np.asarray(loss) ** 2))
