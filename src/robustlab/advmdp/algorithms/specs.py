"""The algorithms as specifications, and their parameter schedules as functions of (K, H, d, A).

Every algorithm here is policy optimisation: one FTRL instance per state over the cumulative
(estimated Q minus dilated bonus) losses (brief 2.1). They differ in the regulariser, the loss estimator,
whether the dilated bonus is used, how Sigma_hat^+ is obtained in simulator mode, and the schedule.

Schedules (brief 3.3, 4.3, 6.1, 6.3; the paper's exact constants could not be retrieved, so each has two
documented constants c_eta, c_beta chosen once on a pilot instance and then frozen):

* ``alg1``  (log-barrier + bonus)        eta = c_eta sqrt(A ln(AK) / (d H^4 K)), beta = c_beta eta H^2,
  gamma = 8e eta beta H^2 (bonus-magnitude condition eta max B <= 1/(4H), brief 2.5).
* ``alg2``  (Hedge + MR-unbiased + bonus) eta = c_eta sqrt(ln A / (d H^4 K)), beta = c_beta eta H^2,
  gamma = max(16 eta^2 H^2, 8e eta beta H^2).  ``alg2clip``: same with the MR-clip estimator.
* ``luo21`` (Hedge + plain estimator + bonus + MGR) eta = c_eta (ln A / (d H^1.5 K))^(2/3), gamma0 = 4 eta H,
  beta = c_beta sqrt(eta H^3), gamma = max(gamma0, 8e eta beta H^2).
* ``fullinfo`` (Hedge on the exact Q^{pi_k}_k) eta = c_eta sqrt(ln A / (H^2 K)).
* ``expweights`` / ``lbnobonus``: ``alg2`` / ``alg1`` with the bonus switched off (same eta and gamma).
* ``uniform``: the uniform policy (upper reference).
* ``alg3``: simulator-free linear-MDP algorithm, see :mod:`robustlab.advmdp.algorithms.alg3`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from robustlab.errors import UserError

E = math.e


@dataclass(frozen=True)
class Params:
    """Learning rate eta, bonus coefficient beta, covariance regulariser gamma (all >= 0, gamma > 0 where
    an estimator is used), and simulator budgets: M (MGR rollouts), N (plug-in rollouts), n_neg (rollouts
    for E[x_-] of the MR-unbiased estimator), n_bonus (rollouts per (s, a) for the Monte-Carlo bonus)."""

    eta: float
    beta: float = 0.0
    gamma: float = 0.0
    M: int = 0
    N: int = 0
    n_neg: int = 0
    n_bonus: int = 1


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    title: str
    regularizer: str  # "hedge" | "log_barrier" | "uniform"
    estimator: str  # "plain" | "mr_unbiased" | "mr_clip" | "exact_q" | "none"
    bonus: bool
    sim_covariance: str  # "mgr" | "plugin" | "none"
    rate: str
    c_eta: float
    c_beta: float
    schedule: Callable[[int, int, int, int, float, float], Params]

    def params(
        self, K: int, H: int, d: int, A: int, c_eta: float | None = None, c_beta: float | None = None
    ) -> Params:
        p = self.schedule(
            K, H, d, A, self.c_eta if c_eta is None else c_eta, self.c_beta if c_beta is None else c_beta
        )
        return p


def _sim_budgets(p: Params, K: int, H: int, d: int) -> Params:
    """Simulator budgets from gamma: M = ceil((2/gamma) ln(HK/gamma)) (MGR, c = 1/2, brief 3.3);
    N = ceil((1/gamma) ln(dHK)) (plug-in spectral guarantee); n_neg = N."""
    g = max(p.gamma, 1e-12)
    M = math.ceil((2 / g) * math.log(max(H * K / g, 2.0)))
    N = math.ceil((1 / g) * math.log(max(d * H * K, 2.0)))
    return replace(p, M=M, N=N, n_neg=N)


def _alg1(K: int, H: int, d: int, A: int, ce: float, cb: float) -> Params:
    eta = ce * math.sqrt(A * math.log(A * K) / (d * H**4 * K))
    beta = cb * eta * H**2
    gamma = 8 * E * eta * beta * H**2
    return _sim_budgets(Params(eta, beta, gamma), K, H, d)


def _alg2(K: int, H: int, d: int, A: int, ce: float, cb: float) -> Params:
    eta = ce * math.sqrt(math.log(A) / (d * H**4 * K))
    beta = cb * eta * H**2
    gamma = max(16 * eta**2 * H**2, 8 * E * eta * beta * H**2)
    return _sim_budgets(Params(eta, beta, gamma), K, H, d)


def _luo21(K: int, H: int, d: int, A: int, ce: float, cb: float) -> Params:
    eta = ce * (math.log(A) / (d * H**1.5 * K)) ** (2 / 3)
    gamma0 = 4 * eta * H
    beta = cb * math.sqrt(eta * H**3)
    gamma = max(gamma0, 8 * E * eta * beta * H**2)
    return _sim_budgets(Params(eta, beta, gamma), K, H, d)


def _fullinfo(K: int, H: int, d: int, A: int, ce: float, cb: float) -> Params:
    return Params(ce * math.sqrt(math.log(A) / (H**2 * K)))


def _uniform(K: int, H: int, d: int, A: int, ce: float, cb: float) -> Params:
    return Params(0.0)


# Placeholder constants below are replaced by FROZEN_CONSTANTS (pilot instance seed 1) further down.
ALGORITHMS: dict[str, AlgorithmSpec] = {
    "alg1": AlgorithmSpec(
        "alg1",
        "Alg 1: log-barrier FTRL + dilated bonus",
        "log_barrier",
        "plain",
        True,
        "plugin",
        "sqrt(K), poly(A)",
        10.0,
        0.1,
        _alg1,
    ),
    "alg2": AlgorithmSpec(
        "alg2",
        "Alg 2: Hedge + magnitude-reduced (unbiased) estimator + dilated bonus",
        "hedge",
        "mr_unbiased",
        True,
        "plugin",
        "sqrt(K), log(A)",
        30.0,
        0.1,
        _alg2,
    ),
    "alg2clip": AlgorithmSpec(
        "alg2clip",
        "Alg 2 (MR-clip variant)",
        "hedge",
        "mr_clip",
        True,
        "plugin",
        "sqrt(K), log(A)",
        30.0,
        0.1,
        _alg2,
    ),
    "luo21": AlgorithmSpec(
        "luo21",
        "Luo, Wei, Lee 2021: Hedge + dilated bonus + MGR",
        "hedge",
        "plain",
        True,
        "mgr",
        "K^(2/3)",
        10.0,
        0.1,
        _luo21,
    ),
    "fullinfo": AlgorithmSpec(
        "fullinfo",
        "Full-information policy optimisation (lower reference)",
        "hedge",
        "exact_q",
        False,
        "none",
        "sqrt(K)",
        10.0,
        0.0,
        _fullinfo,
    ),
    "expweights": AlgorithmSpec(
        "expweights",
        "Exp-weights PO without bonus (Alg 2 with B = 0)",
        "hedge",
        "mr_unbiased",
        False,
        "plugin",
        "no guarantee",
        30.0,
        0.1,
        _alg2,
    ),
    "lbnobonus": AlgorithmSpec(
        "lbnobonus",
        "Log-barrier PO without bonus (Alg 1 with B = 0)",
        "log_barrier",
        "plain",
        False,
        "plugin",
        "no guarantee",
        10.0,
        0.1,
        _alg1,
    ),
    "uniform": AlgorithmSpec(
        "uniform",
        "Uniform policy (upper reference)",
        "uniform",
        "none",
        False,
        "none",
        "K",
        0.0,
        0.0,
        _uniform,
    ),
}
# Constants (c_eta, c_beta) chosen by `robustlab advmdp tune` (experiment.TuneConfig's protocol) on the PILOT
# instance (standard shape, instance seed 1), K = 100000, stochastic losses: coordinate
# search over c_eta in {1, 10, 100, 1000} x c_beta in {0.03, 0.3, 3, 10} screened with 1 seed, each axis
# extended by a decade (up to twice) while the best point sat on its edge, then the best point and
# its half-decade c_eta neighbours with 3 seeds; the best of those is frozen here. The evaluation instance
# is seed 0; nothing is tuned on it. Grids, scores and the edge record: results/advmdp/tune/ (TUNING below).
FROZEN_CONSTANTS: dict[str, tuple[float, float]] = {
    "alg1": (31.6228, 0.0003),
    "alg2": (31.6228, 0.0003),
    "alg2clip": (31.6228, 0.0003),  # same schedule as alg2 (not tuned separately)
    "expweights": (31.6228, 0.0003),  # alg2 without the bonus: alg2's constants
    "lbnobonus": (31.6228, 0.0003),  # alg1 without the bonus: alg1's constants
    "luo21": (10, 0.003),
    "fullinfo": (3.16228e06, 0),
}
# Where each choice sits in its final grid (an axis named here kept its best value on the edge after the
# allowed extensions).
TUNING: dict[str, dict] = {
    "alg2": {
        "c_eta_grid": [1.0, 10.0, 100.0, 1000.0],
        "c_beta_grid": [0.0003, 0.003, 0.03, 0.3, 3.0, 10.0],
        "on_grid_edge": ["c_beta"],
    },
    "luo21": {
        "c_eta_grid": [1.0, 10.0, 100.0, 1000.0],
        "c_beta_grid": [0.0003, 0.003, 0.03, 0.3, 3.0, 10.0],
        "on_grid_edge": [],
    },
    "fullinfo": {
        "c_eta_grid": [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0],
        "c_beta_grid": [0.0],
        "on_grid_edge": ["c_eta"],
    },
    "alg1": {
        "c_eta_grid": [1.0, 10.0, 100.0, 1000.0],
        "c_beta_grid": [0.0003, 0.003, 0.03, 0.3, 3.0, 10.0],
        "on_grid_edge": ["c_beta"],
    },
}
# The specs' default constants are the frozen ones.
ALGORITHMS = {
    k: replace(v, c_eta=FROZEN_CONSTANTS[k][0], c_beta=FROZEN_CONSTANTS[k][1]) if k in FROZEN_CONSTANTS else v
    for k, v in ALGORITHMS.items()
}

CONTROL_SUFFIX = "_control"
CONTROLLED = ("alg1", "alg2", "luo21")


def control_of(spec: AlgorithmSpec) -> AlgorithmSpec:
    """The eta-matched full-information control of a bandit algorithm: the same regulariser, the same
    schedule and constants (so the same eta_K), fed the exact Q^{pi_k}_k instead of an estimator, with no
    bonus. R_bandit - R_control is then what the bandit feedback (estimator variance, gamma-bias, bonus)
    costs at that eta, separated from the learning-rate burn-in both share."""
    return replace(
        spec,
        name=spec.name + CONTROL_SUFFIX,
        title=f"eta-matched full-information control of {spec.name}",
        estimator="exact_q",
        bonus=False,
        sim_covariance="none",
        rate="(control)",
    )


def base_name(name: str) -> str:
    """``alg2_control`` -> ``alg2`` (the algorithm whose constants a control shares); others unchanged."""
    return name[: -len(CONTROL_SUFFIX)] if name.endswith(CONTROL_SUFFIX) else name


ALGORITHMS.update({a + CONTROL_SUFFIX: control_of(ALGORITHMS[a]) for a in CONTROLLED})
ALGORITHM_NAMES = (*ALGORITHMS, "alg3")


def get_spec(name: str) -> AlgorithmSpec:
    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm {name!r}", f"choose from {', '.join(ALGORITHM_NAMES)}")
    return ALGORITHMS[name]


def with_constants(spec: AlgorithmSpec, c_eta: float, c_beta: float) -> AlgorithmSpec:
    return replace(spec, c_eta=float(c_eta), c_beta=float(c_beta))
