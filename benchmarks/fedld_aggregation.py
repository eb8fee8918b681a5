"""Aggregation time: FedLD's principal-gradient aggregation vs FedAvg's weighted mean, same client deltas.

For m clients in {5, 12, 50} and P parameters in {1M, 11M} (11M is ResNet-18 size), the script builds m
float32 client deltas laid out like a CNN state dict (P split over 10 weight tensors, plus 10 BN-sized
vectors and an int64 ``num_batches_tracked`` counter), and times

- ``fedavg``: Flower's FedAvg arithmetic (``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``:
  ``acc += value * weight`` in the arrays' own dtype), on plain numpy dicts;
- ``mean_delta``: robustlab's float64 weighted mean (what the FedLD controls use);
- ``fedld``: ``principal_gradient_aggregate`` (float64 Gram matrix, eigh, blockwise).

Each timing is the median of ``--repeats`` runs after one warm-up. Writes ``OUT/fedld_aggregation.json``
with the seconds and the ratios fedld/fedavg. Threads default to 1 (set before numpy is imported), so
numbers are comparable across machines; pass ``--threads 0`` to leave BLAS at its default.

    python benchmarks/fedld_aggregation.py --out runs/bench
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.add_argument("--clients", default="5,12,50", help="comma-separated client counts m")
    p.add_argument("--params", default="1000000,11000000", help="comma-separated parameter counts P")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (0 = library default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads > 0:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from robustlab.fedld.aggregation import mean_delta, principal_gradient_aggregate  # noqa: E402
from robustlab.runs import atomic_write_json, environment_info  # noqa: E402


def layout(num_params: int) -> dict[str, tuple[int, ...]]:
    """P split over 10 weight tensors, plus 10 BN-sized vectors and a scalar counter."""
    big = num_params // 10
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(10):
        size = big if i < 9 else num_params - 9 * big
        shapes[f"layer{i}.weight"] = (size,)
        shapes[f"layer{i}.bn.bias"] = (512,)
    shapes["bn.num_batches_tracked"] = ()
    return shapes


def make_deltas(m: int, num_params: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    base = {k: rng.standard_normal(s, dtype=np.float32) for k, s in layout(num_params).items() if s}
    for i in range(m):
        d: dict[str, np.ndarray] = {}
        for k, s in layout(num_params).items():
            if not s:
                d[k] = np.array(4, dtype=np.int64)
            else:
                # clients share a common direction plus their own noise (as real deltas do)
                d[k] = (0.5 * base[k] + rng.standard_normal(s, dtype=np.float32)) * np.float32(
                    1e-3 * (1 + i % 3)
                )
        out.append(d)
    return out


def fedavg_flower(deltas: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """The arithmetic of Flower's ``aggregate_arrayrecords`` on numpy dicts."""
    total = sum(weights)
    factors = [w / total for w in weights]
    acc: dict[str, np.ndarray] = {}
    for delta, f in zip(deltas, factors, strict=True):
        for k, v in delta.items():
            if k not in acc:
                acc[k] = v * f
            else:
                acc[k] += v * f
    return acc


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clients = [int(x) for x in args.clients.split(",") if x]
    params = [int(float(x)) for x in args.params.split(",") if x]
    rows = []
    for num_params in params:
        for m in clients:
            need = m * num_params * 4 * 2.2  # deltas + temporaries
            avail = available_bytes()
            if avail is not None and need > 0.6 * avail:
                print(
                    f"skip m={m} P={num_params}: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free"
                )
                rows.append({"clients": m, "params": num_params, "skipped": "not enough memory"})
                continue
            deltas = make_deltas(m, num_params, args.seed)
            weights = [float(100 + 37 * i) for i in range(m)]
            t_avg = timed(lambda d=deltas, w=weights: fedavg_flower(d, w), args.repeats)
            t_mean = timed(lambda d=deltas, w=weights: mean_delta(d, w), args.repeats)
            t_ld = timed(lambda d=deltas: principal_gradient_aggregate(d, 0.8), args.repeats)
            row = {
                "clients": m,
                "params": num_params,
                "fedavg_s": t_avg,
                "mean_delta_float64_s": t_mean,
                "fedld_s": t_ld,
                "ratio_fedld_vs_fedavg": t_ld / t_avg,
                "ratio_fedld_vs_mean_delta": t_ld / t_mean,
            }
            rows.append(row)
            print(
                f"m={m:3d} P={num_params / 1e6:5.1f}M  fedavg {t_avg * 1e3:8.1f} ms  float64 mean {t_mean * 1e3:8.1f} ms"
                f"  fedld {t_ld * 1e3:8.1f} ms  ratio {t_ld / t_avg:5.1f}x",
                flush=True,
            )
            del deltas
    result = {
        "benchmark": "fedld_aggregation",
        "what": "server aggregation time for one round, FedLD principal-gradient vs FedAvg weighted mean",
        "threads": args.threads,
        "repeats": args.repeats,
        "rows": rows,
        "environment": environment_info(seed=args.seed),
        "cpu_count": os.cpu_count(),
    }
    path = atomic_write_json(out / "fedld_aggregation.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
