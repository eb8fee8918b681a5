"""Alg 3 [R]: log-barrier policy optimisation for simulator-free linear MDPs (brief section 5).

Every detail here is a reconstruction (the paper's body could not be retrieved): it follows the epoch
skeleton of Luo, Wei, Lee 2021 with Dai et al.'s two changes, log-barrier FTRL and the plug-in covariance
inverse in place of MGR. Choices made, each easy to change through :class:`Alg3Config`:

* Phase 0 (``K0`` episodes): exploration with the uniform policy (the policy cover is {uniform}); its
  transitions start the regression data D_h.
* Epochs of ``W`` episodes. In each episode, with probability ``delta_e`` the uniform cover policy is run
  (its transitions are added to D), otherwise pi_j. The first ``N`` pi_j-episodes of the epoch give the
  plug-in inverse Sigma_hat^+ = (Sigma_hat + gamma I)^-1 (actions averaged analytically); the remaining
  pi_j-episodes I_j give theta_hat_{j,h} = Sigma_hat^+ (1/|I_j|) sum phi(s_{i,h}, a_{i,h}) L_{i,h}.
* Dilated bonus without a simulator: an optimistic least-squares backward recursion on D (kept as running
  sufficient statistics, transition counts and Lambda_h, not as a list of samples),
  B_j(s,a) = b_j(s,a) + (1 + 1/H) clip(phi^T w_h + beta_B ||phi||_{Lambda_h^-1}, 0, B_max) with
  w_h = Lambda_h^-1 sum_{(s,a,s') in D_h} phi(s,a) sum_a' pi_j(a'|s') B_j(s', a').
* C_{j+1} = C_j + W (Qhat_j - B_j); pi_j is log-barrier FTRL on C_j at every state (the "known state"
  restriction is dropped: with a finite instance every state is evaluated).
* Powers of K: W = ceil(K^(1/3)), N = ceil(W / 2), delta_e = c_explore K^(-1/9), K0 = ceil(K^(2/3)),
  gamma = c_gamma K^(-1/3), eta = c_eta K^(-2/3), beta = c_beta eta H^2 [R: tuned as K-powers].

Forced exploration costs regret directly: an episode of the uniform cover policy pays the uniform policy's
gap, so the schedule adds about delta_e K (V_uniform - V_pi) = c_explore K^(8/9) (gap) to the regret;
``alg3_exploration`` in :mod:`robustlab.advmdp.sweep` measures it against c_explore = 0.

Everything the learner uses comes from real episodes; the exact value of pi is used only to measure
regret. Costs are counted inside K (no simulator).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from robustlab.advmdp.algorithms.engine import RunResult
from robustlab.advmdp.algorithms.specs import Params
from robustlab.advmdp.exact import comparator_value, policy_evaluation
from robustlab.advmdp.ftrl import log_barrier
from robustlab.advmdp.losses import LossSequence
from robustlab.advmdp.mdp import LinearMDP
from robustlab.errors import UserError


@dataclass(frozen=True)
class Alg3Config:
    c_eta: float = 1.0
    c_beta: float = 0.1
    c_gamma: float = 0.5
    beta_B: float = 0.1
    ridge: float = 1.0
    c_explore: float = 1.0  # delta_e = c_explore K^(-1/9); 0 switches the forced exploration off

    def schedule(self, K: int, H: int) -> dict:
        W = max(2, math.ceil(K ** (1 / 3)))
        eta = self.c_eta * K ** (-2 / 3)
        return {
            "W": W,
            "N": max(1, math.ceil(W / 2)),
            "delta_e": min(1.0, self.c_explore * K ** (-1 / 9)),
            "K0": min(K, math.ceil(K ** (2 / 3))),
            "gamma": self.c_gamma * K ** (-1 / 3),
            "eta": eta,
            "beta": self.c_beta * eta * H**2,
            "B_max": 2.0 * H,
        }


def _trajectory(mdp: LinearMDP, pi: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    H, n, A = mdp.H, mdp.n_states, mdp.n_actions
    S = np.empty(H, dtype=int)
    Aa = np.empty(H, dtype=int)
    s = min(int(np.searchsorted(np.cumsum(mdp.rho), rng.random(), side="right")), n - 1)
    for h in range(H):
        S[h] = s
        Aa[h] = min(int(np.searchsorted(np.cumsum(pi[h, s]), rng.random(), side="right")), A - 1)
        if h < H - 1:
            s = min(int(np.searchsorted(np.cumsum(mdp.P[h, s, Aa[h]]), rng.random(), side="right")), n - 1)
    return S, Aa


def _regression(
    phi: np.ndarray, counts: np.ndarray, Lam: np.ndarray, y_next: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares of y(s') on phi(s, a) over the data D = {(s, a, s')}, from its sufficient
    statistics: X^T y = sum_D phi(s,a) y(s') = Phi^T (N y) with N the (nA x n) transition counts, and
    Lambda = ridge I + X^T X. Returns w = Lambda^-1 X^T y and Lambda^-1."""
    Lam_inv = np.linalg.inv(Lam)
    return Lam_inv @ (phi.T @ (counts @ y_next)), Lam_inv


def run_alg3(
    mdp: LinearMDP, losses: LossSequence, K: int, seed: int, config: Alg3Config | None = None
) -> RunResult:
    """Run Alg 3 for K real episodes (one seed). Returns the same record as the engine."""
    if losses.adaptive or losses.theta is None:
        raise UserError("alg3 runs on oblivious loss sequences only", "use stochastic, switching or needle")
    if int(K) != K or K <= 0:
        raise UserError(f"K must be a positive integer, got {K}", "pass K >= 1")
    t0 = time.perf_counter()
    cfg = config or Alg3Config()
    H, n, A, d = mdp.phi.shape
    sch = cfg.schedule(K, H)
    rng = np.random.default_rng([seed, 3])
    uniform = np.full((H, n, A), 1.0 / A)
    C = np.zeros((H, n, A))
    # Running sufficient statistics of the regression data D_h = {(s, a, s')}: the transition counts
    # N_h(s, a, s') (H-1, n*A, n) and Lambda_h = ridge I + sum_D phi phi^T (H-1, d, d). For a finite
    # instance they determine every quantity the least-squares recursion needs (see _regression).
    trans_counts = np.zeros((max(H - 1, 0), n * A, n))
    Lam = np.broadcast_to(cfg.ridge * np.eye(d), (max(H - 1, 0), d, d)).copy()
    exp_loss = 0.0
    real_loss = 0.0
    k = 0

    def play(pi: np.ndarray, record: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nonlocal k, exp_loss, real_loss
        table = mdp.loss_table(losses.theta[k])
        V, _ = policy_evaluation(mdp, pi, table)
        exp_loss += float(mdp.rho @ V[0])
        S, Aa = _trajectory(mdp, pi, rng)
        ell = table[np.arange(H), S, Aa]
        real_loss += float(ell.sum())
        if record:
            for h in range(H - 1):
                trans_counts[h, S[h] * A + Aa[h], S[h + 1]] += 1.0
                f = mdp.phi[h, S[h], Aa[h]]
                Lam[h] += np.outer(f, f)
        k += 1
        return S, Aa, ell

    while k < min(sch["K0"], K):
        play(uniform, True)
    while k < K:
        pi = log_barrier(C, sch["eta"])
        cov_states: list[np.ndarray] = []
        est: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for _ in range(sch["W"]):
            if k >= K:
                break
            if rng.random() < sch["delta_e"]:
                play(uniform, True)
                continue
            S, Aa, ell = play(pi, False)
            if len(cov_states) < sch["N"]:
                cov_states.append(S)  # covariance batch (independent of the estimation batch)
            else:
                est.append((S, Aa, ell))
        if not est or not cov_states:
            continue
        states = np.array(cov_states)  # (N, H)
        Qhat = np.zeros((H, n, A))
        w_norm = np.zeros((H, n, A))
        for h in range(H):
            counts = np.bincount(states[:, h], minlength=n) / len(states)
            sig = np.einsum("s,sa,sai,saj->ij", counts, pi[h], mdp.phi[h], mdp.phi[h]) + sch[
                "gamma"
            ] * np.eye(d)
            Sp = np.linalg.inv(sig)
            g = np.zeros(d)
            for S, Aa, ell in est:
                g += mdp.phi[h, S[h], Aa[h]] * ell[h:].sum()
            theta_hat = Sp @ (g / len(est))
            Qhat[h] = mdp.phi[h] @ theta_hat
            w_norm[h] = np.einsum("sai,ij,saj->sa", mdp.phi[h], Sp, mdp.phi[h])
        b = sch["beta"] * (w_norm + (pi * w_norm).sum(-1, keepdims=True))
        Bd = np.zeros((H, n, A))
        Bd[H - 1] = b[H - 1]
        for h in reversed(range(H - 1)):
            nxt_val = (pi[h + 1] * Bd[h + 1]).sum(-1)  # value of B at next-layer states
            w, Lam_inv = _regression(mdp.phi[h].reshape(n * A, d), trans_counts[h], Lam[h], nxt_val)
            bonus_opt = cfg.beta_B * np.sqrt(np.einsum("sai,ij,saj->sa", mdp.phi[h], Lam_inv, mdp.phi[h]))
            Bd[h] = b[h] + (1 + 1 / H) * np.clip(mdp.phi[h] @ w + bonus_opt, 0.0, sch["B_max"])
        C += (len(est) + len(cov_states)) * (Qhat - Bd)  # pi_j was played this many episodes
    comp = comparator_value(mdp, losses.theta[:K].sum(0))
    params = Params(sch["eta"], sch["beta"], sch["gamma"], N=sch["N"])
    return RunResult(
        "alg3",
        K,
        [seed],
        [params],
        "simulator-free",
        np.array([exp_loss - comp]),
        np.array([real_loss - comp]),
        [K],
        np.array([[exp_loss - comp]]),
        np.array([0]),
        np.array([0]),
        time.perf_counter() - t0,
        extra={"schedule": sch},
    )
