"""Adversarial loss sequences (brief 7.3), as per-episode loss weights theta_k of shape (H, d).

All sequences except :func:`adaptive` are **oblivious**: the whole sequence is fixed by its own seed before
the game, independent of the learner (``LossSequence.theta`` holds it, shape ``(K, H, d)``). The learner
seed then varies only the learner's randomness, so runs are comparable (brief 7.4, shared randomness).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robustlab.advmdp.mdp import LinearMDP
from robustlab.errors import UserError

LOSS_SEQUENCES = ("stochastic", "switching", "needle", "adaptive")


@dataclass(frozen=True, eq=False)
class LossSequence:
    """``theta`` ``(K, H, d)`` for oblivious sequences; ``None`` with ``adaptive=True`` (computed online)."""

    name: str
    K: int
    theta: np.ndarray | None
    adaptive: bool = False
    note: str = ""


def _check_K(K: int) -> int:
    if int(K) != K or K <= 0:
        raise UserError(f"K must be a positive integer, got {K}", "pass K >= 1")
    return int(K)


def _mean(mdp: LinearMDP, rng: np.random.Generator) -> np.ndarray:
    return mdp.theta_mean if mdp.theta_mean is not None else rng.random((mdp.H, mdp.dim))


def stochastic(mdp: LinearMDP, K: int, seed: int = 0) -> LossSequence:
    """theta_{k,h,i} ~ Bernoulli(theta_mean_{h,i}), drawn once in advance (oblivious, bandit noise)."""
    K = _check_K(K)
    rng = np.random.default_rng([int(seed), 21])
    mean = _mean(mdp, rng)
    theta = (rng.random((K, mdp.H, mdp.dim)) < mean).astype(float)
    return LossSequence("stochastic", K, theta, note="Bernoulli(theta_mean) coordinates, oblivious")


def _hindsight_value(mdp: LinearMDP, theta_sum: np.ndarray) -> tuple[np.ndarray, float]:
    from robustlab.advmdp.exact import best_policy_in_hindsight

    return best_policy_in_hindsight(mdp, mdp.loss_table(theta_sum))


def switching(mdp: LinearMDP, K: int, seed: int = 0, max_tries: int = 200) -> LossSequence:
    """theta^(1) for k <= K/2 and theta^(2) afterwards (an FTL-breaker).

    theta^(1), theta^(2) in [0,1]^(H x d) are drawn from the seed until the best fixed policy over all K
    episodes differs from both halves' optima (checked by exact DP), so following the first half's leader
    is wrong and the comparator is neither half's optimum.
    """
    K = _check_K(K)
    rng = np.random.default_rng([int(seed), 23])
    half = K // 2
    for _ in range(max_tries):
        t1, t2 = rng.random((mdp.H, mdp.dim)), rng.random((mdp.H, mdp.dim))
        if K < 2:
            break
        p1, _ = _hindsight_value(mdp, t1)
        p2, _ = _hindsight_value(mdp, t2)
        pa, _ = _hindsight_value(mdp, half * t1 + (K - half) * t2)
        if not np.array_equal(pa, p1) and not np.array_equal(pa, p2):
            break
    theta = np.empty((K, mdp.H, mdp.dim))
    theta[:half] = t1
    theta[half:] = t2
    return LossSequence("switching", K, theta, note="theta1 for the first half, theta2 after (FTL-breaker)")


def needle(mdp: LinearMDP, K: int, seed: int = 0, epsilon: float | None = None) -> LossSequence:
    """Lower-bound style: every coordinate Bernoulli(1/2) except one hidden direction i* with mean
    1/2 - epsilon, epsilon = sqrt(d / K) by default (capped at 1/2). Every algorithm pays about sqrt(dK)."""
    K = _check_K(K)
    rng = np.random.default_rng([int(seed), 29])
    eps = min(0.5, np.sqrt(mdp.dim / K)) if epsilon is None else float(epsilon)
    mean = np.full((mdp.H, mdp.dim), 0.5)
    mean[:, rng.integers(mdp.dim)] -= eps
    theta = (rng.random((K, mdp.H, mdp.dim)) < mean).astype(float)
    return LossSequence("needle", K, theta, note=f"hidden direction better by epsilon={eps:.4g}")


def adaptive(mdp: LinearMDP, K: int, seed: int = 0) -> LossSequence:
    """**Stress test beyond the theory** (the paper's guarantees are for oblivious adversaries [R]).

    theta_{k,h} = e_{i*} with i* = argmax_i E_{q_k, pi_k}[phi_{h,i}]: the adversary reads the learner's
    current policy (a deterministic function of the history) and puts loss 1 on the feature direction the
    learner uses most. Regret is measured against the best fixed policy of the realised sequence.
    Only valid for features on the simplex (then losses stay in [0, 1]).
    """
    K = _check_K(K)
    if mdp.phi.min() < 0:
        raise UserError("the adaptive adversary needs nonnegative (simplex) features", "use another instance")
    return LossSequence(
        "adaptive", K, None, adaptive=True, note="adaptive adversary: stress test, beyond the theory"
    )


def adaptive_theta(phibar: np.ndarray) -> np.ndarray:
    """The adaptive adversary's response to the learner's expected features ``phibar`` ``(..., H, d)``."""
    out = np.zeros_like(phibar)
    idx = phibar.argmax(-1)
    np.put_along_axis(out, idx[..., None], 1.0, axis=-1)
    return out


def make_losses(name: str, mdp: LinearMDP, K: int, seed: int = 0) -> LossSequence:
    """Build a loss sequence by name and validate it against the MDP (losses in [0, 1])."""
    makers = {"stochastic": stochastic, "switching": switching, "needle": needle, "adaptive": adaptive}
    if name not in makers:
        raise UserError(f"unknown loss sequence {name!r}", f"choose from {', '.join(LOSS_SEQUENCES)}")
    seq = makers[name](mdp, K, seed)
    if seq.theta is not None:
        mdp.check_theta(seq.theta, f"{name} losses")
    return seq
