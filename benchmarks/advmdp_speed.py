"""Speed of the advmdp episode loop: the numba backend against the batched NumPy engine, same run, one core.

Usage: ``python benchmarks/advmdp_speed.py --out runs/bench [--episodes 2000] [--seeds 10]``

Standard instance (H=5, 20 states per layer, A=5, d=8), exact-oracle mode, stochastic losses, parameters
of the K = 1e5 cell. For each algorithm: seed-episodes per second of the NumPy engine with ``--seeds``
seeds batched (its best case) and of the numba backend (one seed after another), the fastest of
``--repeats`` timed runs each, and their ratio. BLAS is limited to one thread. The machine may be
shared: the 1-minute load average is recorded with the numbers, and ratios are more stable than rates.
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


def best_seconds(fn, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls: on a shared machine the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--episodes", type=int, default=2000, help="episodes per timed numba run")
    ap.add_argument("--numpy-episodes", type=int, default=300, help="episodes per timed NumPy run")
    ap.add_argument("--seeds", type=int, default=10, help="seeds batched in the NumPy engine")
    ap.add_argument("--algorithms", default="alg2,alg2clip,alg1,luo21,fullinfo,uniform")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from robustlab.advmdp.algorithms import get_spec, run_algorithm
    from robustlab.advmdp.losses import make_losses
    from robustlab.advmdp.mdp import LinearMDP

    mdp = LinearMDP.random(5, 20, 5, 8, seed=0)
    losses = make_losses("stochastic", mdp, max(args.episodes, args.numpy_episodes), seed=0)
    seeds = list(range(args.seeds))
    rows = {}
    for name in args.algorithms.split(","):
        spec = get_spec(name)
        p = spec.params(100_000, mdp.H, mdp.dim, mdp.n_actions)
        run_algorithm(mdp, losses, spec, p, 10, [0], backend="numba")  # JIT compile / load the cache

        def numpy_run(spec=spec, p=p):
            run_algorithm(mdp, losses, spec, p, args.numpy_episodes, seeds, backend="numpy")

        def numba_run(spec=spec, p=p):
            run_algorithm(mdp, losses, spec, p, args.episodes, [0, 1], backend="numba")

        np_rate = args.numpy_episodes * len(seeds) / best_seconds(numpy_run, args.repeats)
        nb_rate = args.episodes * 2 / best_seconds(numba_run, args.repeats)
        rows[name] = {
            "numpy_batched_seed_episodes_per_s": np_rate,
            "numba_seed_episodes_per_s": nb_rate,
            "numba_over_numpy": nb_rate / np_rate,
            "numpy_seeds_batched": len(seeds),
            "load_average_1min": os.getloadavg()[0],
        }
        print(
            f"{name:10s} numpy {np_rate:9.0f} seed-ep/s ({len(seeds)} seeds batched)  numba {nb_rate:9.0f} "
            f"seed-ep/s  x{nb_rate / np_rate:.1f}  (load {os.getloadavg()[0]:.1f})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "advmdp_speed.json"
    record = {
        "instance": "standard H=5 n=20 A=5 d=8 seed 0",
        "mode": "oracle",
        "parameters": "schedule at K = 1e5, frozen constants",
        "cpu_count": os.cpu_count(),
        "results": rows,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
