"""Whole-round wall time of FedLD vs FedAvg in the same Flower simulation (goal: FedLD <= 1.10x FedAvg).

One ``run_simulation`` (Ray, 5 SuperNodes) trains alternating blocks FedAvg, FedLD, FedAvg, FedLD, ...
(``--rounds`` rounds each, the first round of a block dropped as warm-up) on RetinaMNIST from the shared
data folder (else scikit-learn digits). Per round it records the training phase (configure, client
training, aggregation), the server-side aggregation alone, and the whole round (with client and server
evaluation) and the 1-minute load average when it ended (other work on a shared machine). Writes
``<out>/<name>.json`` (default name ``fedld_round``) with medians, the FedLD / FedAvg ratios and the load.

    python benchmarks/fedld_round.py --out runs/bench [--rounds 6] [--blocks 2]
        [--model efficientnet-lite0 --pretrained --image-size 64] [--name fedld_round_lite0_64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per block")
    ap.add_argument("--blocks", type=int, default=2, help="FedAvg/FedLD block pairs")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--model", default="cnn", help="cnn, efficientnet-lite0, resnet18 or resnet50")
    ap.add_argument("--pretrained", action="store_true", help="ImageNet weights for the backbone")
    ap.add_argument("--image-size", type=int, default=0, help="image side the model sees (0 = the data's)")
    ap.add_argument("--name", default="fedld_round", help="file name (without .json) under --out")
    args = ap.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback; before it is imported
    import torch
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from robustlab.fedld.client_app import app as client_app
    from robustlab.fedld.server_app import run_training
    from robustlab.fedld.strategies import FedAvg, FedLD
    from robustlab.fedld.task import TaskSpec, load_task
    from robustlab.paths import shared_data_dir
    from robustlab.runs import environment_info

    torch.set_num_threads(1)
    root = shared_data_dir()
    if root is not None and (root / "medmnist" / "retinamnist.npz").is_file():
        spec = TaskSpec("retinamnist", str(root / "medmnist"), args.clients, 0.5, 0)
    else:
        spec = TaskSpec("digits", None, args.clients, 0.5, 0)
    spec = TaskSpec(**{**spec.__dict__, "model": args.model, "pretrained": args.pretrained,
                       "image_size": args.image_size})  # fmt: skip
    task = load_task(spec)
    rows: dict[str, list[dict]] = {"fedavg": [], "fedld": []}
    errors: list[BaseException] = []
    app = ServerApp()

    @app.main()
    def _main(grid, context):
        try:
            n = args.clients
            common = {"min_train_nodes": n, "min_available_nodes": n, "min_evaluate_nodes": n}
            for block in range(args.blocks):
                for name, make in (("fedavg", lambda: FedAvg(**common)), ("fedld", lambda: FedLD(**common))):
                    _, hist = run_training(
                        grid,
                        make(),
                        task,
                        num_rounds=args.rounds,
                        train_config={**spec.to_config(), "cell": f"{name}-{block}"},
                        init_seed=block,
                        on_round=lambda rec: rec.update(load_average=os.getloadavg()[0]),
                    )
                    rows[name] += hist[2:]  # drop round 0 (no training) and round 1 (warm-up)
        except BaseException as exc:
            errors.append(exc)

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    if errors:
        raise errors[0]

    def med(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in rows[name]))

    result = {
        "benchmark": "fedld_round",
        "dataset": spec.dataset,
        "model": spec.model,
        "pretrained": spec.pretrained,
        "image_size": int(task.image_size),
        "clients": args.clients,
        "rounds_measured_per_method": len(rows["fedld"]),
        "model_parameters": int(sum(p.numel() for p in task.build_model().parameters())),
        "median_seconds": {
            name: {
                "train_phase": med(name, "train_seconds"),
                "aggregation": med(name, "aggregate_seconds"),
                "whole_round": med(name, "seconds"),
            }
            for name in rows
        },
        "ratio_fedld_over_fedavg": {
            "train_phase": med("fedld", "train_seconds") / med("fedavg", "train_seconds"),
            "aggregation": med("fedld", "aggregate_seconds") / med("fedavg", "aggregate_seconds"),
            "whole_round": med("fedld", "seconds") / med("fedavg", "seconds"),
        },
        "per_round": {
            name: [
                {k: r[k] for k in ("round", "seconds", "train_seconds", "aggregate_seconds", "load_average")}
                for r in rows[name]
            ]
            for name in rows
        },
        "load_average_1min": {
            "start": load_start,
            "end": os.getloadavg()[0],
            "median_over_measured_rounds": float(
                statistics.median(r["load_average"] for name in rows for r in rows[name])
            ),
        },
        "cpu_count": os.cpu_count(),
        "goal": "whole_round ratio <= 1.10",
        "wall_seconds": time.perf_counter() - t0,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "env": environment_info(),  # package versions, git commit and the command line behind the numbers
    }
    result["goal_met"] = result["ratio_fedld_over_fedavg"]["whole_round"] <= 1.10
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_seconds"], indent=2))
    print(json.dumps(result["ratio_fedld_over_fedavg"], indent=2), "goal met:", result["goal_met"])


if __name__ == "__main__":
    main()
