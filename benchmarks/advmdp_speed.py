"""Speed of the vectorised advmdp episode loop against a plain per-state Python-loop version.

Usage: ``python benchmarks/advmdp_speed.py --out runs/bench [--episodes 300] [--seeds 10]``

Standard instance (H=5, 20 states per layer, A=5, d=8), exact-oracle mode, stochastic losses. For each
algorithm: episodes per second of the engine with all seeds batched (seed-episodes per second), of the
engine with one seed, and of the per-state Python-loop reference below (one seed), all measured in this
run on one core; the JSON holds the ratios. The loop reference is also the independent implementation
that tests/advmdp/test_engine.py checks the engine against, episode by episode.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# One core, as the goal states: BLAS reads this when NumPy is first imported, so it must be set here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from robustlab.advmdp.algorithms.specs import AlgorithmSpec, Params


def loop_reference(
    mdp, theta: np.ndarray, spec: AlgorithmSpec, params: Params, K: int, seed: int, block: int = 1024
):
    """The same algorithm as the engine's oracle mode, written state by state with Python loops.

    Uses the transition tensor P directly (not the low-rank mu factorisation), per-state FTRL calls,
    explicit sums over (s, a) for occupancy, covariance, estimator, E[x_-] and the dilated bonus. It
    consumes the same uniforms as the engine (stream ``[seed, 1]``), so its expected losses agree with
    the engine's to rounding. Returns (sum of expected losses, final cumulative losses C (H, n, A)).
    """
    from robustlab.advmdp.ftrl import hedge, log_barrier

    H, n, A, d = mdp.phi.shape
    rng = np.random.default_rng([seed, 1])
    C = np.zeros((H, n, A))
    total = 0.0
    eta, beta, gamma = params.eta, params.beta, params.gamma
    for k in range(K):
        if k % block == 0:
            U = rng.random((min(block, K - k), 2 * H))
        u = U[k % block]
        pi = np.empty((H, n, A))
        for h in range(H):
            for s in range(n):
                if spec.regularizer == "hedge":
                    pi[h, s] = hedge(C[h, s], eta)
                elif spec.regularizer == "log_barrier":
                    pi[h, s] = log_barrier(C[h, s], eta)
                else:
                    pi[h, s] = 1.0 / A
        loss = np.array(
            [[[mdp.phi[h, s, a] @ theta[k][h] for a in range(A)] for s in range(n)] for h in range(H)]
        )
        q = np.zeros((H, n))
        q[0] = mdp.rho
        for h in range(H - 1):
            for s in range(n):
                for a in range(A):
                    q[h + 1] += q[h, s] * pi[h, s, a] * mdp.P[h, s, a]
        total += sum(
            q[h, s] * pi[h, s, a] * loss[h, s, a] for h in range(H) for s in range(n) for a in range(A)
        )
        # trajectory with the engine's inverse-CDF convention
        S, Aa = [], []
        s = int(np.searchsorted(np.cumsum(mdp.rho), u[0], side="right"))
        s = min(s, n - 1)
        for h in range(H):
            S.append(s)
            cum = np.cumsum(pi[h, s])
            cum[-1] = 2.0
            a = int((u[2 * h + 1] > cum).sum())
            Aa.append(a)
            if h < H - 1:
                pc = np.cumsum(mdp.P[h, s, a])
                pc[-1] = 2.0
                s = int((u[2 * h + 2] > pc).sum())
        ell = [loss[h, S[h], Aa[h]] for h in range(H)]
        if spec.estimator == "none":
            continue
        if spec.estimator == "exact_q":
            V = np.zeros(n)
            for h in reversed(range(H)):
                for s in range(n):
                    for a in range(A):
                        C[h, s, a] += loss[h, s, a] + (mdp.P[h, s, a] @ V if h < H - 1 else 0.0)
                Vn = np.zeros(n)
                for s in range(n):
                    Qs = [loss[h, s, a] + (mdp.P[h, s, a] @ V if h < H - 1 else 0.0) for a in range(A)]
                    Vn[s] = pi[h, s] @ np.array(Qs)
                V = Vn
            continue
        L = [sum(ell[j] for j in range(h, H)) for h in range(H)]
        Qt = np.zeros((H, n, A))
        bonus_b = np.zeros((H, n, A))
        for h in range(H):
            sigma = gamma * np.eye(d)
            for s in range(n):
                for a in range(A):
                    sigma += q[h, s] * pi[h, s, a] * np.outer(mdp.phi[h, s, a], mdp.phi[h, s, a])
            Sp = np.linalg.inv(sigma)
            fk = mdp.phi[h, S[h], Aa[h]]
            for s in range(n):
                for a in range(A):
                    x = mdp.phi[h, s, a] @ Sp @ fk
                    val = x * L[h]
                    if spec.estimator == "mr_unbiased":
                        eneg = 0.0
                        for t in range(n):
                            for b in range(A):
                                g = mdp.phi[h, s, a] @ Sp @ mdp.phi[h, t, b]
                                eneg += q[h, t] * pi[h, t, b] * max(-g, 0.0)
                        val += (H - h) * (max(-x, 0.0) - eneg)
                    elif spec.estimator == "mr_clip":
                        val = max(val, -1.0 / (2 * eta))
                    Qt[h, s, a] = val
                    bonus_b[h, s, a] = mdp.phi[h, s, a] @ Sp @ mdp.phi[h, s, a]
            for s in range(n):
                w = bonus_b[h, s].copy()
                bonus_b[h, s] = beta * (w + pi[h, s] @ w)
        if spec.bonus and beta > 0:
            Bd = np.zeros((H, n, A))
            for h in reversed(range(H)):
                for s in range(n):
                    for a in range(A):
                        nxt = 0.0
                        if h < H - 1:
                            for t in range(n):
                                nxt += mdp.P[h, s, a, t] * (pi[h + 1, t] @ Bd[h + 1, t])
                        Bd[h, s, a] = bonus_b[h, s, a] + (1 + 1 / H) * nxt
            Qt -= Bd
        C += Qt
    return total, C


def best_seconds(fn, fn_args: tuple, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls: on a shared machine the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*fn_args)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--episodes", type=int, default=400, help="episodes per timed engine run")
    ap.add_argument("--loop-episodes", type=int, default=5, help="episodes for the Python-loop reference")
    ap.add_argument("--seeds", type=int, default=10, help="seeds batched in the vectorised engine")
    ap.add_argument("--algorithms", default="alg2,alg2clip,alg1,luo21,fullinfo,uniform")
    ap.add_argument("--repeats", type=int, default=3, help="engine timings keep the fastest of these runs")
    args = ap.parse_args()

    from robustlab.advmdp.algorithms import get_spec, run_algorithm
    from robustlab.advmdp.losses import make_losses
    from robustlab.advmdp.mdp import LinearMDP

    mdp = LinearMDP.random(5, 20, 5, 8, seed=0)
    K_sched = 100_000  # parameters as in the K = 1e5 cell of the sweep
    K = args.episodes
    losses = make_losses("stochastic", mdp, max(K, args.loop_episodes), seed=0)
    rows = {}
    for name in args.algorithms.split(","):
        spec = get_spec(name)
        params = spec.params(K_sched, mdp.H, mdp.dim, mdp.n_actions)
        run_algorithm(mdp, losses, spec, params, 20, [0])  # warm-up
        seconds = {
            B: best_seconds(run_algorithm, (mdp, losses, spec, params, K, list(range(B))), args.repeats)
            for B in (args.seeds, 1)
        }
        batched, single = K * args.seeds / seconds[args.seeds], K / seconds[1]
        t = time.perf_counter()
        loop_reference(mdp, losses.theta, spec, params, args.loop_episodes, 0)
        loop = args.loop_episodes / (time.perf_counter() - t)
        rows[name] = {
            "engine_batched_episodes_per_s": batched,
            "engine_single_seed_episodes_per_s": single,
            "loop_reference_episodes_per_s": loop,
            "speedup_batched_vs_loop": batched / loop,
            "speedup_single_vs_loop": single / loop,
            "seeds_batched": args.seeds,
            "repeats": args.repeats,
        }
        print(
            f"{name:10s} engine {batched:9.0f} ep/s ({args.seeds} seeds batched), {single:8.0f} ep/s (1 seed); "
            f"loop reference {loop:7.1f} ep/s; speedup x{batched / loop:.0f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "advmdp_speed.json"
    record = {
        "instance": "standard H=5 n=20 A=5 d=8 seed 0",
        "mode": "oracle",
        "load_average_1min_at_end": os.getloadavg()[0],  # the machine is shared: numbers scale with the load
        "cpu_count": os.cpu_count(),
        "results": rows,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
