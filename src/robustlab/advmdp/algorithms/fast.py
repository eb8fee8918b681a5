"""The compiled backend (numba) of the exact-oracle episode loop: the same algorithm as the NumPy engine,
one fused loop per seed.

Why a compiled loop: the NumPy engine pays ~60 array calls per episode step whatever the batch size,
and Alg 2's exact E[x_-] is an (nA x nA) Gram matrix per layer. Here one seed's whole block of episodes
runs inside one compiled function, and the Gram-matrix reduction of E[x_-] is vectorised
(:func:`_negative_part_mean`).

Every formula is the one documented in :mod:`robustlab.advmdp.steps` (policy, occupancy, covariance
inverse, plain / MR-unbiased / MR-clip estimators, bonus, dilated recursion, FTRL update); the tests
check this backend against the NumPy engine and the readable path at rtol 1e-9 for every algorithm.
Seeds use the same uniform streams as the other paths (``default_rng([seed, 1])``), so a seed's
trajectory is the same in every backend.
"""

from __future__ import annotations

import math
import time

import numpy as np
from numba import njit

from robustlab.advmdp.algorithms.specs import AlgorithmSpec, Params

REGULARIZERS = {"hedge": 0, "log_barrier": 1, "uniform": 2}
ESTIMATORS = {"none": 0, "exact_q": 1, "plain": 2, "mr_unbiased": 3, "mr_clip": 4}
_BLOCK = 1 << 15  # episodes of uniforms drawn at a time (memory stays bounded for K = 1e6)
# reassociation and FMA contraction let LLVM vectorise the reductions (differences ~1e-16 relative)
_FM = {"reassoc", "contract", "nsz"}


@njit(cache=True, fastmath=_FM)
def _episodes(  # one fused loop on purpose (see the module docstring)
    k0,
    U,
    PhiF,
    PhiT8,
    mu,
    Pcum,
    rho,
    theta,
    adaptive,
    reg,
    est,
    use_bonus,
    eta,
    beta,
    gamma,
    C,
    tlb,
    acc,
    ckpts,
    curve,
    curve_theta,
    theta_sum,
):
    H, nA, d = PhiF.shape
    n = rho.shape[0]
    A = nA // n
    dil = 1.0 + 1.0 / H
    pi = np.empty((H, nA))
    wq = np.empty((H, nA))
    phibar = np.empty((H, d))
    q = np.empty(n)
    q2 = np.empty(n)
    Sig = np.empty((d, d))
    Lc = np.empty((d, d))
    Sp = np.empty((d, d))
    VmT = np.zeros((max(d, 8), nA))  # rows d..7 stay 0 (padding for the unrolled Gram)
    xv = np.empty(nA)
    norm2 = np.empty((H, nA))
    Qt = np.empty((H, nA))
    Bn = np.empty((H, nA))
    thk = np.empty((H, d))
    S = np.empty(H, np.int64)
    Aa = np.empty(H, np.int64)
    ell = np.empty(H)
    L = np.empty(H)
    Vs = np.empty(n)
    wh = np.empty(d)
    eneg = np.empty(nA)
    rows = np.empty(A)
    ci = int(acc[2])
    for kk in range(U.shape[0]):
        k = k0 + kk
        u = U[kk]
        # 1. policy at every state (steps.policy)
        for h in range(H):
            for s in range(n):
                o = s * A
                m = C[h, o]
                for a in range(1, A):
                    m = min(m, C[h, o + a])
                if reg == 0:  # Hedge: softmax of -eta (C - min C)
                    z = 0.0
                    for a in range(A):
                        rows[a] = math.exp(-eta * (C[h, o + a] - m))
                        z += rows[a]
                    for a in range(A):
                        pi[h, o + a] = rows[a] / z
                elif reg == 1:  # log-barrier: p_a = 1/(eta (C_a - min C) + t), sum_a p_a = 1
                    t = tlb[h, s]
                    for _ in range(100):
                        g = 0.0
                        gp = 0.0
                        for a in range(A):
                            r = 1.0 / (eta * (C[h, o + a] - m) + t)
                            g += r
                            gp += r * r
                        if abs(g - 1.0) <= 1e-13:
                            break
                        t = max(t + (g - 1.0) / gp, 1.0)
                    tlb[h, s] = t
                    z = 0.0
                    for a in range(A):
                        rows[a] = 1.0 / (eta * (C[h, o + a] - m) + t)
                        z += rows[a]
                    for a in range(A):
                        pi[h, o + a] = rows[a] / z
                else:
                    for a in range(A):
                        pi[h, o + a] = 1.0 / A
        # 2. occupancy and expected features (steps.occupancy)
        for s in range(n):
            q[s] = rho[s]
        for h in range(H):
            for s in range(n):
                for a in range(A):
                    wq[h, s * A + a] = q[s] * pi[h, s * A + a]
            for j in range(d):
                v = 0.0
                for i in range(nA):
                    v += wq[h, i] * PhiT8[h, j, i]
                phibar[h, j] = v
            if h < H - 1:
                for s in range(n):
                    v = 0.0
                    for j in range(d):
                        v += phibar[h, j] * mu[h, j, s]
                    q2[s] = v
                for s in range(n):
                    q[s] = q2[s]
        el = 0.0
        for h in range(H):
            if adaptive:  # adaptive adversary: loss 1 on the most used feature direction
                best = 0
                for j in range(1, d):
                    if phibar[h, j] > phibar[h, best]:
                        best = j
                for j in range(d):
                    thk[h, j] = 1.0 if j == best else 0.0
                    theta_sum[h, j] += thk[h, j]
            else:
                for j in range(d):
                    thk[h, j] = theta[k, h, j]
            for j in range(d):
                el += phibar[h, j] * thk[h, j]
        acc[0] += el
        # 3. one trajectory by inverse-CDF sampling (steps.sample_trajectory)
        s = 0
        cum = rho[0]
        while s < n - 1 and cum <= u[0]:  # s_1 = #{s : CDF(s) <= u}, as np.searchsorted(side="right")
            s += 1
            cum += rho[s]
        rl = 0.0
        for h in range(H):
            S[h] = s
            o = s * A
            a = 0
            cum = pi[h, o]
            while a < A - 1 and u[2 * h + 1] > cum:
                a += 1
                cum += pi[h, o + a]
            Aa[h] = a
            i = o + a
            e = 0.0
            for j in range(d):
                e += PhiF[h, i, j] * thk[h, j]
            ell[h] = e
            rl += e
            if h < H - 1:
                t2 = 0
                while t2 < n - 1 and u[2 * h + 2] > Pcum[h, s, a, t2]:
                    t2 += 1
                s = t2
        acc[1] += rl
        if ci < ckpts.shape[0] and ckpts[ci] == k + 1:
            curve[ci] = acc[0]
            for h in range(H):
                for j in range(d):
                    curve_theta[ci, h, j] = theta_sum[h, j]
            ci += 1
        # 4. feedback
        if est == 0:
            continue
        if est == 1:  # exact Q^{pi_k}_k (steps.exact_q)
            for h in range(H - 1, -1, -1):
                for j in range(d):
                    v = thk[h, j]
                    if h < H - 1:
                        for s2 in range(n):
                            v += mu[h, j, s2] * Vs[s2]
                    wh[j] = v
                for i in range(nA):
                    xv[i] = 0.0
                for j in range(d):
                    c = wh[j]
                    for i in range(nA):
                        xv[i] += c * PhiT8[h, j, i]
                for s2 in range(n):
                    vv = 0.0
                    for a in range(A):
                        i = s2 * A + a
                        C[h, i] += xv[i]
                        vv += pi[h, i] * xv[i]
                    Vs[s2] = vv
            continue
        acc_l = 0.0
        for h in range(H - 1, -1, -1):
            acc_l += ell[h]
            L[h] = acc_l
        for h in range(H):
            # (Sigma + gamma I)^-1 (steps.covariance_inverse); i-innermost reductions over PhiT vectorise
            P = PhiT8[h]
            w = wq[h]
            for j in range(d):
                for j2 in range(j, d):
                    v = 0.0
                    for i in range(nA):
                        v += w[i] * P[j, i] * P[j2, i]
                    Sig[j, j2] = v
                    Sig[j2, j] = v
                Sig[j, j] += gamma
            _spd_inverse(Sig, Lc, Sp)
            # VmT[:, i] = Sp phi_i; norm2_i = ||phi_i||^2_Sp
            for j in range(d):
                for i in range(nA):
                    VmT[j, i] = 0.0
                for j2 in range(d):
                    c = Sp[j, j2]
                    for i in range(nA):
                        VmT[j, i] += c * P[j2, i]
            for i in range(nA):
                norm2[h, i] = 0.0
            for j in range(d):
                for i in range(nA):
                    norm2[h, i] += VmT[j, i] * P[j, i]
            # x_i = phi_i^T Sp phi_{k,h}; plain / MR / clip estimators (steps.*_estimator)
            ik = S[h] * A + Aa[h]
            Hh = float(H - h)
            for i in range(nA):
                xv[i] = 0.0
            for j in range(d):
                c = VmT[j, ik]
                for i in range(nA):
                    xv[i] += c * P[j, i]
            for i in range(nA):
                Qt[h, i] = xv[i] * L[h]
            if est == 3:
                for i in range(nA):
                    Qt[h, i] += Hh * max(-xv[i], 0.0)
            elif est == 4:
                for i in range(nA):
                    Qt[h, i] = max(Qt[h, i], -1.0 / (2.0 * eta))
            if est == 3:  # E[x_-] from the Gram matrix (steps.negative_part_mean)
                _negative_part_mean(VmT, P, w, eneg)
                for i in range(nA):
                    Qt[h, i] -= Hh * eneg[i]
        if use_bonus:  # b and the dilated recursion (steps.bonus, steps.dilated_bonus)
            for h in range(H):
                for s2 in range(n):
                    o = s2 * A
                    avg = 0.0
                    for a in range(A):
                        avg += pi[h, o + a] * norm2[h, o + a]
                    for a in range(A):
                        Bn[h, o + a] = beta * (norm2[h, o + a] + avg)
            for h in range(H - 2, -1, -1):
                for s2 in range(n):
                    o = s2 * A
                    v = 0.0
                    for a in range(A):
                        v += pi[h + 1, o + a] * Bn[h + 1, o + a]
                    Vs[s2] = v
                for j in range(d):
                    v = 0.0
                    for s2 in range(n):
                        v += mu[h, j, s2] * Vs[s2]
                    wh[j] = v
                for j in range(d):
                    c = dil * wh[j]
                    for i in range(nA):
                        Bn[h, i] += c * PhiT8[h, j, i]
            for h in range(H):
                for i in range(nA):
                    Qt[h, i] -= Bn[h, i]
        for h in range(H):
            for i in range(nA):
                C[h, i] += Qt[h, i]
    acc[2] = ci


@njit(cache=True, fastmath=_FM)
def _spd_inverse(M, L, out):
    """out = M^-1 for a symmetric positive-definite M (here Sigma + gamma I), by Cholesky M = L L^T and
    M^-1 = L^-T L^-1: for d = 8 a few hundred flops, far below a LAPACK call's overhead."""
    d = M.shape[0]
    for j in range(d):
        v = M[j, j]
        for k in range(j):
            v -= L[j, k] * L[j, k]
        L[j, j] = math.sqrt(v)
        for i in range(j + 1, d):
            v = M[i, j]
            for k in range(j):
                v -= L[i, k] * L[j, k]
            L[i, j] = v / L[j, j]
        for i in range(j):
            L[i, j] = 0.0
    # L <- L^-1 in place (lower triangular), column by column
    for j in range(d):
        L[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, d):
            v = 0.0
            for k in range(j, i):
                v -= L[i, k] * L[k, j]
            L[i, j] = v / L[i, i]
    for i in range(d):
        for j in range(i, d):
            v = 0.0
            for k in range(j, d):
                v += L[k, i] * L[k, j]
            out[i, j] = v
            out[j, i] = v


@njit(cache=True, fastmath=_FM)
def _negative_part_mean(VmT, PhiT, w, eneg):
    """eneg_i = sum_j w_j max(-G_ij, 0), G_ij = (Sp phi_i) . phi_j, for one layer (``VmT[:, i] = Sp phi_i``).

    j is the innermost loop over contiguous memory and only a reduction (no scatter), so LLVM
    vectorises it; for d <= 8 (zero-padded to 8) the dot product is unrolled with the d coefficients
    of row i held in registers. The symmetry G_ij = G_ji is not used: exploiting it needs a scatter
    into eneg_j that blocks vectorisation and measured slower."""
    nA = VmT.shape[1]
    if VmT.shape[0] == 8:
        for i in range(nA):
            v0, v1, v2, v3 = VmT[0, i], VmT[1, i], VmT[2, i], VmT[3, i]
            v4, v5, v6, v7 = VmT[4, i], VmT[5, i], VmT[6, i], VmT[7, i]
            acc = 0.0
            for j in range(nA):
                g = (
                    v0 * PhiT[0, j]
                    + v1 * PhiT[1, j]
                    + v2 * PhiT[2, j]
                    + v3 * PhiT[3, j]
                    + v4 * PhiT[4, j]
                    + v5 * PhiT[5, j]
                    + v6 * PhiT[6, j]
                    + v7 * PhiT[7, j]
                )
                acc += w[j] * max(-g, 0.0)
            eneg[i] = acc
        return
    d = VmT.shape[0]
    gb = np.empty(nA)
    for i in range(nA):
        for j in range(nA):
            gb[j] = 0.0
        for k in range(d):
            v = VmT[k, i]
            for j in range(nA):
                gb[j] += v * PhiT[k, j]
        acc = 0.0
        for j in range(nA):
            acc += w[j] * max(-gb[j], 0.0)
        eneg[i] = acc


def run_seed(
    mdp, theta: np.ndarray | None, adaptive: bool, spec: AlgorithmSpec, p: Params, K: int, seed: int, ckpts
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """One seed for K episodes. Returns (sum of expected losses, realised loss, expected-loss curve at
    ``ckpts``, theta_sum at ``ckpts`` (adaptive sequences; zeros otherwise))."""
    H, n, A, d = mdp.phi.shape
    PhiF = np.ascontiguousarray(mdp.phi.reshape(H, n * A, d))
    PhiT8 = np.zeros((H, max(d, 8), n * A))  # phi^T, zero-padded to 8 rows (see _negative_part_mean)
    PhiT8[:, :d] = PhiF.transpose(0, 2, 1)
    mu = np.ascontiguousarray(mdp.mu) if H > 1 else np.zeros((1, d, n))
    Pcum = np.cumsum(mdp.P, axis=-1) if H > 1 else np.zeros((1, n, A, n))
    Pcum[..., -1] = 2.0
    th = np.zeros((1, H, d)) if theta is None else np.ascontiguousarray(theta, dtype=float)
    C = np.zeros((H, n * A))
    tlb = np.ones((H, n))
    acc = np.zeros(3)
    ck = np.asarray(ckpts, dtype=np.int64)
    curve = np.zeros(len(ck))
    curve_theta = np.zeros((len(ck), H, d))
    theta_sum = np.zeros((H, d))
    rng = np.random.default_rng([int(seed), 1])
    for k0 in range(0, K, _BLOCK):
        U = rng.random((min(_BLOCK, K - k0), 2 * H))
        _episodes(
            k0,
            U,
            PhiF,
            PhiT8,
            mu,
            Pcum,
            mdp.rho,
            th,
            bool(adaptive),
            REGULARIZERS[spec.regularizer],
            ESTIMATORS[spec.estimator],
            bool(spec.bonus),
            float(p.eta),
            float(p.beta),
            float(p.gamma),
            C,
            tlb,
            acc,
            ck,
            curve,
            curve_theta,
            theta_sum,
        )
    return float(acc[0]), float(acc[1]), curve, curve_theta


def run_fast(mdp, losses, spec: AlgorithmSpec, params: list[Params], K: int, seeds: list[int], ckpts):
    """Every seed in turn; returns the pieces :func:`engine.run_algorithm` assembles into a RunResult."""
    t0 = time.perf_counter()
    out = [
        run_seed(mdp, losses.theta, losses.adaptive, spec, p, K, s, ckpts)
        for p, s in zip(params, seeds, strict=True)
    ]
    return out, time.perf_counter() - t0
