"""FTRL solvers against scipy's constrained optimiser, KKT invariants (hypothesis), and the refined
log-barrier stability inequality of the brief's section 3.1."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from robustlab.advmdp.ftrl import (
    hedge,
    log_barrier,
    log_barrier_bregman,
    log_barrier_objective,
    stability_bound,
)


def scipy_simplex_min(fun, A, x0=None):
    x0 = np.full(A, 1 / A) if x0 is None else x0
    res = minimize(
        fun,
        x0,
        method="SLSQP",
        bounds=[(1e-12, 1)] * A,
        constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return res.x, res.fun


@pytest.mark.parametrize("seed", range(6))
def test_log_barrier_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    A = rng.integers(2, 7)
    C = rng.normal(size=A) * 3
    eta = 10 ** rng.uniform(-1, 0.5)
    p = log_barrier(C, eta)
    p_ref, f_ref = scipy_simplex_min(lambda q: log_barrier_objective(q, C, eta), A)
    assert log_barrier_objective(p, C, eta) <= f_ref + 1e-9
    assert np.abs(p - p_ref).max() < 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_hedge_matches_scipy_and_closed_form(seed):
    rng = np.random.default_rng(seed)
    A, eta = 5, 0.7
    C = rng.normal(size=A) * 2
    p = hedge(C, eta)
    assert np.allclose(p, np.exp(-eta * C) / np.exp(-eta * C).sum())
    _, f_ref = scipy_simplex_min(lambda q: q @ C + (q * np.log(q)).sum() / eta, A)
    assert p @ C + (p * np.log(p)).sum() / eta <= f_ref + 1e-9


finite = st.floats(min_value=-1e8, max_value=1e8, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    C=st.lists(finite, min_size=2, max_size=8),
    log_eta=st.floats(min_value=-4, max_value=2),
)
def test_log_barrier_kkt_for_arbitrary_sign_and_magnitude(C, log_eta):
    C = np.array(C)
    eta = 10.0**log_eta
    p, t = log_barrier(C, eta, return_multiplier=True)
    assert np.all(p > 0) and abs(p.sum() - 1) < 1e-9
    # KKT: 1 / (eta p_a) - (C_a - min C) is the same multiplier for every action
    lam = 1 / (eta * p) - (C - C.min())
    assert np.allclose(lam, t[0] / eta, rtol=1e-6, atol=1e-9 * (1 + np.abs(C - C.min()).max()))
    # ordering: lower cumulative loss never gets less probability
    order = np.argsort(C, kind="stable")
    assert np.all(np.diff(p[order]) <= 1e-12)
    # warm start from any admissible multiplier gives the same answer
    p2 = log_barrier(C, eta, t0=t * 3.0)
    assert np.allclose(p, p2, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(C=st.lists(finite, min_size=2, max_size=6), log_eta=st.floats(min_value=-3, max_value=1))
def test_hedge_is_a_distribution_for_huge_losses(C, log_eta):
    p = hedge(np.array(C), 10.0**log_eta)
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-9 and np.all(np.isfinite(p))


def test_vectorised_over_leading_axes():
    rng = np.random.default_rng(0)
    C = rng.normal(size=(3, 4, 5)) * 10
    P = log_barrier(C, 0.3)
    for i in range(3):
        for j in range(4):
            assert np.allclose(P[i, j], log_barrier(C[i, j], 0.3))


def lb_stability(p_t, loss, eta):
    """max_{p in simplex} <p_t - p, loss> - D_Psi(p, p_t), by scipy (a concave maximisation)."""
    A = len(p_t)

    def neg(p):
        return -((p_t - p) @ loss - log_barrier_bregman(p, p_t, eta))

    best = -np.inf
    for x0 in (p_t, np.full(A, 1 / A), np.eye(A)[np.argmin(loss)] * 0.98 + 0.02 / A):
        _, f = scipy_simplex_min(neg, A, x0)
        best = max(best, -f)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_refined_log_barrier_stability_holds_for_any_real_loss(seed):
    rng = np.random.default_rng(seed)
    A = int(rng.integers(2, 6))
    eta = 10 ** rng.uniform(-2, 0)
    p_t = log_barrier(rng.normal(size=A) * 5, eta)
    loss = rng.normal(size=A) * 10 ** rng.uniform(0, 3)  # arbitrary sign, often huge negative
    if seed % 3 == 0:
        loss[np.argmin(p_t)] = -(10 ** rng.uniform(2, 4))
    assert lb_stability(p_t, loss, eta) <= stability_bound(p_t, loss, eta) * (1 + 1e-6) + 1e-9


def test_hedge_has_no_such_bound_for_large_negative_losses():
    """Contrast (brief 3.1): Hedge's stability (1/eta) ln sum p e^{-eta l} + <p, l> exceeds 2 eta sum p l^2."""
    eta, p = 0.1, np.array([0.999, 0.001])
    loss = np.array([0.0, -1000.0])
    hedge_stab = np.log(p @ np.exp(-eta * loss)) / eta + p @ loss
    assert hedge_stab > stability_bound(p, loss, eta)
    assert lb_stability(p, loss, eta) <= stability_bound(p, loss, eta) * (1 + 1e-6)
