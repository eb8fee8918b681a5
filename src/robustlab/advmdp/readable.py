"""Each algorithm as one screen of :mod:`robustlab.advmdp.steps` calls: one episode, one learner seed.

This is the reference the batched engines are tested against (``tests/advmdp/test_readable.py``): same
uniforms, same formulas, no batching, no fused loops. Exact-oracle mode only (the simulator-mode pieces
are :func:`robustlab.advmdp.steps.mgr` / ``plugin_inverse`` and the engine's Monte-Carlo bonus).

An episode function takes the cumulative FTRL loss C_k ``(H, n, A)``, a callable giving the episode's
loss weights theta_k ``(H, d)`` from the learner's expected features (a constant for an oblivious
sequence, :func:`robustlab.advmdp.losses.adaptive_theta` for the adaptive one), the trajectory's 2H
uniforms and the parameters; it returns C_{k+1}, V^{pi_k}_k(s_1) and the realised trajectory loss.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from robustlab.advmdp import steps
from robustlab.advmdp.algorithms.specs import AlgorithmSpec, Params
from robustlab.advmdp.exact import comparator_value
from robustlab.advmdp.losses import LossSequence, adaptive_theta
from robustlab.advmdp.mdp import LinearMDP

Losses = Callable[[np.ndarray], np.ndarray]


def _play(mdp: LinearMDP, pi: np.ndarray, losses: Losses, u: np.ndarray):
    """Occupancy, the episode's losses, one trajectory and its suffix losses L_{k,h}."""
    w, phibar = steps.occupancy(mdp, pi)
    theta = losses(phibar)
    S, Aa = steps.sample_trajectory(mdp, pi, u)
    ell = np.einsum("hd,hd->h", mdp.phi[np.arange(mdp.H), S, Aa], theta)
    return w, phibar, theta, S, Aa, ell


def bandit_episode(spec: AlgorithmSpec, mdp: LinearMDP, C, losses: Losses, u, p: Params):
    """Alg 1 (log-barrier, plain Qhat, bonus), Alg 2 (Hedge, MR-unbiased, bonus), Alg 2 MR-clip,
    Luo et al. 2021b (Hedge, plain Qhat, bonus) and the no-bonus ablations (brief 3.2, 4.3, 6.1)."""
    pi = steps.policy(C, p.eta, spec.regularizer)  # 1. FTRL policy at every state
    w, phibar, theta, S, Aa, ell = _play(mdp, pi, losses, u)  # 2. play pi_k once
    L = steps.suffix_losses(ell)
    Sp = steps.covariance_inverse(mdp, w, p.gamma)  # 3. (Sigma_k + gamma I)^-1
    x = steps.estimator_inner(mdp, Sp, S, Aa)  # 4. loss estimator
    if spec.estimator == "mr_unbiased":
        Qt = steps.mr_unbiased_estimator(x, L, steps.negative_part_mean(mdp, Sp, w))
    elif spec.estimator == "mr_clip":
        Qt = steps.mr_clip_estimator(steps.plain_estimator(x, L), p.eta)
    else:
        Qt = steps.plain_estimator(x, L)
    B = steps.dilated_bonus(mdp, steps.bonus(mdp, Sp, pi, p.beta), pi) if spec.bonus else None  # 5.
    return steps.ftrl_update(C, Qt, B), steps.expected_loss(phibar, theta), float(ell.sum())  # 6.


def full_information_episode(spec: AlgorithmSpec, mdp: LinearMDP, C, losses: Losses, u, p: Params):
    """Full-information policy optimisation (brief 6.3) and the eta-matched controls: the same FTRL
    regulariser and eta on the exact Q^{pi_k}_k, with no estimator and no bonus."""
    pi = steps.policy(C, p.eta, spec.regularizer)
    _, phibar, theta, _, _, ell = _play(mdp, pi, losses, u)
    Q = steps.exact_q(mdp, pi, theta)
    return steps.ftrl_update(C, Q), steps.expected_loss(phibar, theta), float(ell.sum())


def uniform_episode(spec: AlgorithmSpec, mdp: LinearMDP, C, losses: Losses, u, p: Params):
    """The uniform policy (upper reference): nothing is learned."""
    pi = steps.policy(C, p.eta, "uniform")
    _, phibar, theta, _, _, ell = _play(mdp, pi, losses, u)
    return C, steps.expected_loss(phibar, theta), float(ell.sum())


def episode_function(spec: AlgorithmSpec):
    if spec.estimator == "exact_q":
        return full_information_episode
    if spec.estimator == "none":
        return uniform_episode
    return bandit_episode


def run_readable(
    mdp: LinearMDP, seq: LossSequence, spec: AlgorithmSpec, params: Params, K: int, seed: int
) -> dict:
    """Run one seed for K episodes with the same uniforms as the engines (stream ``[seed, 1]``).

    Returns ``regret`` (pseudo-regret), ``realized_regret``, the final cumulative loss ``C`` and the
    per-episode expected losses ``expected_losses`` (for adaptive sequences ``theta_sum`` too)."""
    U = np.random.default_rng([int(seed), 1]).random((K, 2 * mdp.H))
    step = episode_function(spec)
    C = np.zeros(mdp.phi.shape[:3])
    exp_losses, real, theta_sum = np.zeros(K), 0.0, np.zeros((mdp.H, mdp.dim))
    for k in range(K):
        if seq.adaptive:

            def losses(phibar):
                return adaptive_theta(phibar)
        else:

            def losses(phibar, k=k):
                return seq.theta[k]

        C, exp_losses[k], r = step(spec, mdp, C, _recording(losses, theta_sum), U[k], params)
        real += r
    comp = comparator_value(mdp, theta_sum)
    return {
        "regret": float(exp_losses.sum() - comp),
        "realized_regret": real - comp,
        "C": C,
        "expected_losses": exp_losses,
        "theta_sum": theta_sum,
    }


def _recording(losses: Losses, theta_sum: np.ndarray) -> Losses:
    def inner(phibar):
        theta = losses(phibar)
        theta_sum[...] += theta
        return theta

    return inner
