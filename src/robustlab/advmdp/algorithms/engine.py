"""The vectorised episode loop of every policy-optimisation algorithm (brief Appendix A and 9.1).

All learner seeds of one run are advanced together: arrays are laid out layer-major as ``(H, B, n, A)``
with B the number of seeds, so that each per-layer constant (features, transition factors) broadcasts
over the seeds and one NumPy call serves every seed and every state. Each seed has its own random
streams (trajectory, simulator), so a seed's result does not depend on which other seeds share the batch.

Two modes:

* ``oracle``: Sigma_{k,h} is computed exactly from the occupancy of pi_k, Sigma_hat^+ = (Sigma + gamma I)^-1,
  the dilated bonus B_k by an exact backward DP, E[x_-] of the MR-unbiased estimator exactly from the
  (nA x nA) Gram matrix. This is the M, N -> infinity limit of the simulator mode.
* ``simulator``: Sigma_hat^+ from MGR (M rollouts) or the plug-in inverse (N rollouts), B_k by one Monte-Carlo
  rollout of pi_k from every (s, a) (B_hat = sum_j (1 + 1/H)^j b(s_{h+j}, a_{h+j})), E[x_-] from n_neg fresh
  rollouts. Every sampled transition is counted (``simulator_calls``).

In both modes the learner's expected loss V^{pi_k}_k(s_1) and the comparator are computed exactly for
measurement only; the learner never sees them (except ``fullinfo``, whose feedback is the exact Q).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from robustlab.advmdp.algorithms.specs import AlgorithmSpec, Params
from robustlab.advmdp.covariance import Simulator, mgr
from robustlab.advmdp.exact import comparator_value
from robustlab.advmdp.ftrl import hedge, log_barrier, row_sum
from robustlab.advmdp.losses import LossSequence, adaptive_theta
from robustlab.advmdp.mdp import LinearMDP
from robustlab.errors import UserError

MODES = ("oracle", "simulator")
BACKENDS = ("numpy", "numba")


@dataclass
class RunResult:
    """Per-seed outcomes of one (algorithm, K) run. Arrays have one entry per seed."""

    algorithm: str
    K: int
    seeds: list[int]
    params: list[Params]  # one per seed
    mode: str
    regret: np.ndarray  # pseudo-regret sum_k V^{pi_k}_k(s_1) - min_pi sum_k V^pi_k(s_1)
    realized_regret: np.ndarray  # realised trajectory losses minus the same comparator (sanity check)
    checkpoints: list[int]
    regret_curve: np.ndarray  # (len(checkpoints), B): pseudo-regret of each prefix
    simulator_calls: np.ndarray
    rollouts: np.ndarray
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "K": self.K,
            "seeds": list(self.seeds),
            "mode": self.mode,
            "params": [p.__dict__ for p in self.params],
            "regret": self.regret.tolist(),
            "realized_regret": self.realized_regret.tolist(),
            "checkpoints": list(self.checkpoints),
            "regret_curve": self.regret_curve.tolist(),
            "simulator_calls": self.simulator_calls.tolist(),
            "rollouts": self.rollouts.tolist(),
            "seconds": self.seconds,
            "episodes_per_second": self.K * len(self.seeds) / max(self.seconds, 1e-12),
            **self.extra,
        }


def default_checkpoints(K: int, n: int = 16) -> list[int]:
    pts = np.unique(np.round(np.logspace(0, math.log10(K), n)).astype(int))
    return sorted({int(p) for p in pts if 1 <= p <= K} | {K})


class _Model:
    """Per-layer constants of an MDP in the layouts the episode step needs."""

    def __init__(self, mdp: LinearMDP) -> None:
        H, n, A, d = mdp.phi.shape
        self.H, self.n, self.A, self.d, self.nA = H, n, A, d, n * A
        self.phi = mdp.phi
        self.PhiF = np.ascontiguousarray(mdp.phi.reshape(H, n * A, d))
        self.PhiFT = np.ascontiguousarray(self.PhiF.transpose(0, 2, 1))
        self.PhiPhi = np.einsum("hki,hkj->hkij", self.PhiF, self.PhiF).reshape(H, n * A, d * d)
        self.PhiPhiT = np.ascontiguousarray(self.PhiPhi.transpose(0, 2, 1))  # (H, d*d, nA)
        self.mu = mdp.mu
        self.muT = np.ascontiguousarray(mdp.mu.transpose(0, 2, 1))  # (H-1, n, d)
        self.Pcum = np.cumsum(mdp.P, axis=-1)
        self.Pcum[..., -1] = 2.0  # uniforms are < 1, so inverse-CDF sampling never runs past the last state
        self.rho_cum = np.cumsum(mdp.rho)
        self.rho = mdp.rho
        self.Hr = (H - np.arange(H)).astype(float)[:, None, None]  # H_h = H - h + 1 (1-based h)
        self.eye = np.eye(d)


def _validate(
    spec: AlgorithmSpec, params: Params, mode: str, K: int, mdp: LinearMDP, losses: LossSequence
) -> None:
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}", f"choose from {', '.join(MODES)}")
    if int(K) != K or K <= 0:
        raise UserError(f"K must be a positive integer, got {K}", "pass K >= 1")
    if losses.K < K:
        raise UserError(
            f"the loss sequence has {losses.K} episodes, fewer than K={K}", "build it with K episodes"
        )
    if losses.theta is not None and losses.theta.shape[1:] != (mdp.H, mdp.dim):
        raise UserError(
            f"dimension mismatch: losses have theta shape {losses.theta.shape[1:]}, MDP needs {(mdp.H, mdp.dim)}",
            "build the loss sequence for this MDP",
        )
    uses_estimator = spec.estimator in ("plain", "mr_unbiased", "mr_clip")
    if uses_estimator and (not np.isfinite(params.gamma) or params.gamma <= 0):
        raise UserError(f"gamma must be > 0, got {params.gamma}", "pass a positive gamma")
    if spec.regularizer != "uniform" and (not np.isfinite(params.eta) or params.eta <= 0):
        raise UserError(f"eta must be > 0, got {params.eta}", "pass a positive learning rate")
    if params.beta < 0:
        raise UserError(f"beta must be >= 0, got {params.beta}", "pass a nonnegative bonus coefficient")


def run_algorithm(
    mdp: LinearMDP,
    losses: LossSequence,
    spec: AlgorithmSpec,
    params: Params | Sequence[Params],
    K: int,
    seeds: Sequence[int],
    mode: str = "oracle",
    checkpoints: Sequence[int] | None = None,
    block: int = 1024,
    backend: str | None = None,
) -> RunResult:
    """Run ``spec`` for K episodes on every learner seed in ``seeds``.

    ``params`` is one :class:`Params` for all seeds, or one per seed (so that a parameter grid runs as a
    single batch, as the constant-selection pilot does). ``backend``: ``numpy`` (all seeds batched in
    array calls) or ``numba`` (a compiled loop per seed, :mod:`.fast`); default: numba when installed.
    Both give the same numbers (rtol 1e-9); simulator mode always runs on NumPy."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("no seeds given", "pass at least one seed")
    params = [params] * len(seeds) if isinstance(params, Params) else list(params)
    if len(params) != len(seeds):
        raise UserError(f"{len(params)} parameter sets for {len(seeds)} seeds", "give one per seed")
    for p in params:
        _validate(spec, p, mode, K, mdp, losses)
    backend = resolve_backend(backend)
    if mode == "oracle" and backend == "numba":
        return _run_fast(mdp, losses, spec, params, K, seeds, checkpoints)
    if mode == "simulator":
        # Simulator mode advances one seed at a time (its rollouts are per seed anyway).
        parts = [
            _run_batch(mdp, losses, spec, [p], K, [s], mode, checkpoints, block)
            for p, s in zip(params, seeds, strict=True)
        ]
        first = parts[0]
        return RunResult(
            spec.name,
            K,
            seeds,
            params,
            mode,
            np.concatenate([p.regret for p in parts]),
            np.concatenate([p.realized_regret for p in parts]),
            first.checkpoints,
            np.concatenate([p.regret_curve for p in parts], axis=1),
            np.concatenate([p.simulator_calls for p in parts]),
            np.concatenate([p.rollouts for p in parts]),
            sum(p.seconds for p in parts),
        )
    return _run_batch(mdp, losses, spec, params, K, seeds, mode, checkpoints, block)


def _run_fast(
    mdp: LinearMDP,
    losses: LossSequence,
    spec: AlgorithmSpec,
    params: list[Params],
    K: int,
    seeds: list[int],
    checkpoints: Sequence[int] | None,
) -> RunResult:
    from robustlab.advmdp.algorithms.fast import run_fast

    ckpts = _checkpoints(K, checkpoints)
    parts, seconds = run_fast(mdp, losses, spec, params, K, seeds, ckpts)
    B = len(seeds)
    curve_learner = np.stack([p[2] for p in parts], axis=1)  # (len(ckpts), B)
    if losses.adaptive:
        comp = np.array(
            [[comparator_value(mdp, parts[b][3][i]) for b in range(B)] for i in range(len(ckpts))]
        )
    else:
        comp = _oblivious_comparators(mdp, losses, ckpts, B)
    curve = curve_learner - comp
    real = np.array([p[1] for p in parts])
    zeros = np.zeros(B, dtype=int)
    return RunResult(
        spec.name,
        K,
        seeds,
        params,
        "oracle",
        curve[-1].copy(),
        real - comp[-1],
        ckpts,
        curve,
        zeros,
        zeros.copy(),
        seconds,
        extra={"backend": "numba"},
    )


def _checkpoints(K: int, checkpoints: Sequence[int] | None) -> list[int]:
    return sorted({int(c) for c in (checkpoints or default_checkpoints(K)) if 1 <= int(c) <= K} | {K})


def _oblivious_comparators(mdp: LinearMDP, losses: LossSequence, ckpts: list[int], B: int) -> np.ndarray:
    """min_pi sum_{k <= c} V^pi_k(s_1) at every checkpoint c, broadcast to ``(len(ckpts), B)``."""
    csum = np.cumsum(losses.theta[: ckpts[-1]], axis=0)
    comp = np.array([comparator_value(mdp, csum[c - 1]) for c in ckpts])[:, None]
    return np.broadcast_to(comp, (len(ckpts), B))


def resolve_backend(backend: str | None) -> str:
    """``None`` -> ``numba`` when it is importable, else ``numpy``; anything else must be one of BACKENDS."""
    if backend is None:
        return "numba" if numba_available() else "numpy"
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}", f"choose from {', '.join(BACKENDS)}")
    if backend == "numba" and not numba_available():
        raise UserError(
            "the numba backend needs numba", "pip install 'robustlab[advmdp]' or use --backend numpy"
        )
    return backend


def numba_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def _run_batch(
    mdp: LinearMDP,
    losses: LossSequence,
    spec: AlgorithmSpec,
    params: list[Params],
    K: int,
    seeds: list[int],
    mode: str,
    checkpoints: Sequence[int] | None,
    block: int,
) -> RunResult:
    t0 = time.perf_counter()
    m = _Model(mdp)
    H, n, A, d, nA, B = m.H, m.n, m.A, m.d, m.nA, len(seeds)
    ckpts = _checkpoints(K, checkpoints)
    traj_rngs = [np.random.default_rng([s, 1]) for s in seeds]
    sims = [Simulator(mdp, np.random.default_rng([s, 2])) for s in seeds] if mode == "simulator" else []

    C = np.zeros((H, B, n, A))
    exp_loss = np.zeros(B)
    real_loss = np.zeros(B)
    theta_sum = np.zeros((B, H, d))  # for adaptive sequences (per seed)
    curve_learner = np.zeros((len(ckpts), B))
    curve_theta = np.zeros((len(ckpts), B, H, d))
    ci = 0

    def per_seed(values: list[float]) -> float | np.ndarray:
        return values[0] if len(set(values)) == 1 else np.array(values, dtype=float).reshape(1, B, 1, 1)

    eta = per_seed([p.eta for p in params])
    beta = per_seed([p.beta for p in params])
    gamma = per_seed([p.gamma for p in params])
    dil = 1.0 + 1.0 / H
    ar_B = np.arange(B)
    h_idx = np.arange(H)[:, None]
    wq = np.empty((H, B, n, A))
    phibar = np.empty((H, B, d))
    S = np.empty((H, B), dtype=np.intp)
    Aa = np.empty((H, B), dtype=np.intp)
    uniform_pi = np.full((H, B, n, A), 1.0 / A)
    rho_B = np.tile(m.rho, (B, 1))
    U = None
    t_lb = None
    if spec.estimator == "mr_unbiased" and mode == "oracle":
        G_buf = np.empty((B * nA, nA))
        absw = np.empty((H, B, nA, 1))

    for k in range(K):
        j = k % block
        if j == 0:
            size = min(block, K - k)
            U = np.stack([r.random((size, 2 * H)) for r in traj_rngs], axis=-1)  # (size, 2H, B)
        u = U[j]

        # 1. policy at every state
        if spec.regularizer == "hedge":
            pi = hedge(C, eta)
        elif spec.regularizer == "log_barrier":
            pi, t_lb = log_barrier(C, eta, tol=1e-10, t0=t_lb, return_multiplier=True)
        else:
            pi = uniform_pi

        # 2. occupancy (exact, forward) -> expected features per layer
        q = rho_B
        for h in range(H):
            np.multiply(q[:, :, None], pi[h], out=wq[h])
            np.matmul(wq[h].reshape(B, nA), m.PhiF[h], out=phibar[h])
            if h < H - 1:
                q = phibar[h] @ m.mu[h]
        if losses.adaptive:
            theta_k = adaptive_theta(phibar)  # (H, B, d): one loss per seed
            exp_loss += np.einsum("hbd,hbd->b", phibar, theta_k)
            theta_sum += theta_k.transpose(1, 0, 2)
        else:
            theta_k = losses.theta[k]  # (H, d): shared by every seed
            exp_loss += np.einsum("hbd,hd->b", phibar, theta_k)

        # 3. one real trajectory of pi_k (bandit feedback)
        s = np.minimum(np.searchsorted(m.rho_cum, u[0], side="right"), n - 1)
        cumpi = np.cumsum(pi, axis=-1)
        cumpi[..., -1] = 2.0
        for h in range(H):
            S[h] = s
            a = (u[2 * h + 1][:, None] > cumpi[h, ar_B, s]).sum(-1)
            Aa[h] = a
            if h < H - 1:
                s = (u[2 * h + 2][:, None] > m.Pcum[h, s, a]).sum(-1)
        feats = m.phi[h_idx, S, Aa]  # (H, B, d)
        ell = np.einsum("hbd,hbd->hb" if losses.adaptive else "hbd,hd->hb", feats, theta_k)
        real_loss += ell.sum(0)

        if ckpts[ci] == k + 1:
            curve_learner[ci] = exp_loss
            if losses.adaptive:
                curve_theta[ci] = theta_sum
            ci += 1
            if ci == len(ckpts):
                ci -= 1

        # 4. FTRL feedback
        if spec.estimator == "none":
            continue
        if spec.estimator == "exact_q":
            V = np.zeros((B, n))
            for h in reversed(range(H)):
                w_h = theta_k[h] + (V @ m.muT[h] if h < H - 1 else np.zeros((B, d)))
                Qh = (w_h @ m.PhiFT[h]).reshape(B, n, A)
                C[h] += Qh
                V = row_sum(pi[h] * Qh)
            continue

        L = np.cumsum(ell[::-1], axis=0)[::-1]  # L_{k,h}: suffix sums
        if mode == "oracle":
            Sigma = np.matmul(wq.reshape(H, B, nA), m.PhiPhi).reshape(H, B, d, d)
            Sigma += gamma * m.eye
            Sp = np.linalg.inv(Sigma)
        else:
            Sp = np.stack([_sim_inverse(mdp, sims[b], spec, params[b], pi[:, b]) for b in range(B)], axis=1)
        v = np.matmul(Sp, feats[..., None])[..., 0]  # (H, B, d)
        x = np.matmul(v, m.PhiFT)  # (H, B, nA): x(s,a) = phi(s,a)^T Sp phi_{k,h}
        Qt = x * L[:, :, None]
        if spec.estimator == "mr_unbiased":
            if mode == "oracle":
                # E_{(s',a') ~ pi_k}[(phi^T Sp phi')_-] = (E|G| - E G) / 2 with the Gram matrix
                # G = Phi Sp Phi^T (nA x nA per layer and seed), in float64 (the backends agree to 1e-9).
                # One layer at a time, so that G (B*nA x nA) stays in cache between the three passes.
                M1 = np.matmul(m.PhiF[:, None], Sp)  # (H, B, nA, d)
                wq64 = wq.reshape(H, B, nA, 1)
                for h in range(H):
                    np.matmul(M1[h].reshape(B * nA, d), m.PhiFT[h], out=G_buf)
                    np.abs(G_buf, out=G_buf)
                    np.matmul(G_buf.reshape(B, nA, nA), wq64[h], out=absw[h])
                signed = np.matmul(np.matmul(Sp, phibar[..., None])[..., 0], m.PhiFT)  # phi^T Sp phibar
                Eneg = 0.5 * (absw[..., 0] - signed)
            else:
                M1 = np.matmul(m.PhiF[:, None], Sp)
                Eneg = np.stack(
                    [_sim_eneg(sims[b], pi[:, b], M1[:, b], params[b].n_neg) for b in range(B)], axis=1
                )
            Qt += m.Hr * (np.maximum(-x, 0.0) - Eneg)
        Qt = Qt.reshape(H, B, n, A)
        if spec.estimator == "mr_clip":
            np.maximum(Qt, -1.0 / (2.0 * eta), out=Qt)
        if spec.bonus and np.any(beta > 0):
            w = np.matmul(Sp.reshape(H, B, d * d), m.PhiPhiT).reshape(H, B, n, A)  # ||phi(s,a)||^2_{Sp}
            b = beta * (w + row_sum(pi * w)[..., None])
            if mode == "oracle":
                nxt = None
                for h in reversed(range(H)):
                    if nxt is not None:
                        b[h] += dil * np.matmul(nxt @ m.muT[h], m.PhiFT[h]).reshape(B, n, A)
                    nxt = row_sum(pi[h] * b[h])
                Bonus = b
            else:
                Bonus = np.stack(
                    [_sim_bonus(sims[bb], pi[:, bb], b[:, bb], dil, params[bb].n_bonus) for bb in range(B)],
                    axis=1,
                )
            Qt -= Bonus
        C += Qt

    # comparator and regret at the checkpoints
    if losses.adaptive:
        comp = np.array(
            [[comparator_value(mdp, curve_theta[i, b]) for b in range(B)] for i in range(len(ckpts))]
        )
    else:
        comp = _oblivious_comparators(mdp, losses, ckpts, B)
    curve = curve_learner - comp
    return RunResult(
        spec.name,
        K,
        seeds,
        params,
        mode,
        curve[-1].copy(),
        real_loss - comp[-1],
        ckpts,
        curve,
        np.array([sim.calls for sim in sims] if sims else [0] * B),
        np.array([sim.rollouts for sim in sims] if sims else [0] * B),
        time.perf_counter() - t0,
        extra={"backend": "numpy"},
    )


# ----------------------------------------------------------------------------- simulator-mode pieces


def _sim_inverse(
    mdp: LinearMDP, sim: Simulator, spec: AlgorithmSpec, params: Params, pi: np.ndarray
) -> np.ndarray:
    """Sigma_hat^+ for every layer from fresh rollouts of pi (independent of the real trajectory)."""
    from robustlab.advmdp.covariance import plugin_inverse

    if spec.sim_covariance == "mgr":
        S, Aa = sim.rollout(pi, params.M)
        return mgr(sim.features(S, Aa), params.gamma, c=min(0.5, 1.0 / (1.0 + params.gamma)))
    S, _ = sim.rollout(pi, params.N)
    return plugin_inverse(mdp, pi, S, params.gamma)


def _sim_eneg(sim: Simulator, pi: np.ndarray, M1: np.ndarray, n_neg: int) -> np.ndarray:
    """E_{(s',a') ~ pi at layer h}[(phi(s,a)^T Sp phi(s',a'))_-] from n_neg fresh rollouts, ``(H, nA)``."""
    S, Aa = sim.rollout(pi, n_neg)
    f = sim.features(S, Aa)  # (n_neg, H, d)
    G = np.einsum("hkd,mhd->hkm", M1, f)
    return np.maximum(-G, 0.0).mean(-1)


def _sim_bonus(sim: Simulator, pi: np.ndarray, b: np.ndarray, dil: float, reps: int) -> np.ndarray:
    """Dilated bonus by Monte Carlo: B_hat(s,a) = sum_j (1+1/H)^j b(s_{h+j}, a_{h+j}) along rollouts of pi
    from (h, s, a), averaged over ``reps`` rollouts per (s, a). ``b``: ``(H, n, A)``."""
    H, n, A = b.shape
    out = np.empty_like(b)
    ss, aa = np.meshgrid(np.arange(n), np.arange(A), indexing="ij")
    ss = np.repeat(ss.ravel(), reps)
    aa = np.repeat(aa.ravel(), reps)
    for h in range(H):
        S, Aa = sim.rollout_from(pi, h, ss, aa)
        L = S.shape[1]
        vals = b[np.arange(h, H)[None, :], S, Aa]  # (m, L)
        weights = dil ** np.arange(L)
        out[h] = (vals @ weights).reshape(n, A, reps).mean(-1)
    return out
