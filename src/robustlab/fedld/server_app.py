"""The FedLD ``ServerApp`` (Flower Message API) and the round loop shared by simulation and deployment.

:func:`run_training` drives one federated training run with any strategy of
:mod:`robustlab.fedld.strategies`. It follows ``flwr.serverapp.strategy.Strategy.start`` step for step
(configure_train -> send_and_receive -> aggregate_train -> configure_evaluate -> send_and_receive ->
aggregate_evaluate -> server-side evaluation) and adds what an experiment needs: it can start at any round
from a checkpoint (global arrays + strategy state + per-round history, written atomically after every
round), and it records per round the server-side metrics on the validation and test splits (accuracy,
balanced accuracy, macro AUC, loss), the clients' accuracies (sample-weighted, unweighted, per client) and
the strategy's diagnostics (FedLD's update-size ratio and cosine).

``app`` is the ServerApp that ``flwr run .`` (pyproject ``[tool.flwr.app]``) and a real deployment
(``flower-superlink`` + ``flower-supernode``) start: it reads ``context.run_config`` (see
:func:`config_from_run_config`), trains one method and, when ``out`` is set, writes the history there.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from robustlab.fedld.strategies import arrays_to_numpy, numpy_to_arrays
from robustlab.fedld.task import Task, TaskSpec, load_task
from robustlab.runs import atomic_write_bytes, atomic_write_json

log = logging.getLogger("robustlab.fedld")

app = ServerApp()


# --------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """One training run's checkpoint: global arrays, strategy state and the per-round history, in one
    ``.npz`` written atomically (temp file + rename), so a kill leaves the previous round's checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def save(
        self, arrays: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray], history: list[dict]
    ) -> None:
        blob = {f"g::{k}": np.asarray(v) for k, v in arrays.items()}
        blob.update({f"s::{k}": np.asarray(v) for k, v in state.items()})
        blob["history"] = np.frombuffer(json.dumps(history).encode("utf-8"), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **blob)
        atomic_write_bytes(self.path, buf.getvalue())

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict]]:
        with np.load(self.path) as z:
            arrays = {k[3:]: z[k] for k in z.files if k.startswith("g::")}
            state = {k[3:]: z[k] for k in z.files if k.startswith("s::")}
            history = json.loads(z["history"].tobytes().decode("utf-8"))
        return arrays, state, history


# --------------------------------------------------------------------------- evaluation


def server_evaluate(task: Task, arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """The global model's metrics on the validation and test splits."""
    model = task.build_model()
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}, strict=True
    )
    return {
        "val": task.evaluate(model, task.x_val, task.y_val, full=True),
        "test": task.evaluate(model, task.x_test, task.y_test, full=True),
    }


def _plain(metrics: Any) -> dict[str, Any]:
    if metrics is None:
        return {}
    out = {}
    for k, v in dict(metrics).items():
        if isinstance(v, list):
            out[k] = [float(x) for x in v]
        else:
            out[k] = float(v) if not isinstance(v, bool) else v
    return out


# --------------------------------------------------------------------------- the round loop


def run_training(
    grid: Grid,
    strategy: Any,
    task: Task,
    *,
    num_rounds: int,
    train_config: Mapping[str, Any],
    evaluate_config: Mapping[str, Any] | None = None,
    init_seed: int = 0,
    round_timeout: float = 3600.0,
    checkpoint: Checkpoint | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Train ``num_rounds`` rounds (continuing from ``checkpoint`` when it exists); return the final global
    arrays and the history (round 0 = the initial model, then one record per round).

    ``round_timeout`` bounds each ``send_and_receive``: a client that has not replied by then is treated
    as failed for that round (the strategy aggregates the others if at least ``min_replies`` arrived).
    """
    torch.manual_seed(init_seed)
    arrays = {k: v.detach().numpy().copy() for k, v in task.build_model().state_dict().items()}
    history: list[dict[str, Any]] = []
    if checkpoint is not None and checkpoint.exists():
        arrays, state, history = checkpoint.load()
        strategy.load_state_dict(state)
        log.info("resuming from round %d (%s)", history[-1]["round"], checkpoint.path)
    if not history:
        rec = {"round": 0, **server_evaluate(task, arrays), "seconds": 0.0}
        history.append(rec)
        if checkpoint is not None:
            checkpoint.save(arrays, strategy.state_dict(), history)
        if on_round is not None:
            on_round(rec)
    record = numpy_to_arrays(arrays)
    for rnd in range(int(history[-1]["round"]) + 1, num_rounds + 1):
        t0 = time.perf_counter()
        messages = strategy.configure_train(rnd, record, ConfigRecord(dict(train_config)), grid)
        replies = grid.send_and_receive(messages=messages, timeout=round_timeout)
        t_sent = time.perf_counter()
        new, train_metrics = strategy.aggregate_train(rnd, replies)
        t_agg = time.perf_counter() - t_sent
        if new is not None:
            record = new
        t_train = time.perf_counter() - t0
        ev_messages = strategy.configure_evaluate(
            rnd, record, ConfigRecord(dict(evaluate_config or train_config)), grid
        )
        ev_replies = grid.send_and_receive(messages=ev_messages, timeout=round_timeout)
        client_metrics = strategy.aggregate_evaluate(rnd, ev_replies)
        arrays = arrays_to_numpy(record)
        rec = {
            "round": rnd,
            **server_evaluate(task, arrays),
            "train": _plain(train_metrics),
            "clients": _plain(client_metrics),
            "diagnostics": dict(strategy.last_diagnostics),
            "skipped": rnd in strategy.skipped_rounds,
            "train_seconds": t_train,
            "aggregate_seconds": t_agg,
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        if checkpoint is not None:
            checkpoint.save(arrays, strategy.state_dict(), history)
        if on_round is not None:
            on_round(rec)
    return arrays, history


def best_round(history: list[dict[str, Any]], key: str = "accuracy") -> dict[str, Any]:
    """The round with the highest validation ``key`` (earliest on ties; round 0 excluded when others
    exist). Test numbers are read at that round, never used to choose it."""
    rounds = [h for h in history if h["round"] > 0] or history
    best = rounds[0]
    for h in rounds[1:]:
        v, b = h["val"][key], best["val"][key]
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v > b:
            best = h
    return best


def best_client_round(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The round with the highest validation accuracy of the clients' own models, pooled over their
    validation shares (earliest on ties; round 0 excluded); ``None`` when the clients reported none. What
    personalised methods (FedBN, FedPAC) are judged by: they never use the server's averaged model."""
    rounds = [
        h for h in history if h["round"] > 0 and (h.get("clients") or {}).get("val-accuracy") is not None
    ]
    if not rounds:
        return None
    best = rounds[0]
    for h in rounds[1:]:
        if h["clients"]["val-accuracy"] > best["clients"]["val-accuracy"]:
            best = h
    return best


# --------------------------------------------------------------------------- flwr run / deployment

#: run-config keys (pyproject ``[tool.flwr.app.config]`` or ``flwr run --run-config``) and their defaults
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "method": "fedld",
    "num-server-rounds": 3,
    "dataset": "digits",
    "data-dir": "",
    "num-partitions": 2,
    "beta": 0.5,
    "seed": 0,
    "lr": 0.01,
    "momentum": 0.5,
    "weight-decay": 5e-4,
    "batch-size": 50,
    "local-epochs": 1,
    "margin-lambda": 0.1,
    "k-proportion": 0.8,
    "proximal-mu": 0.01,
    "fedpac-lambda": 1.0,
    "server-lr": 1.0,
    "min-replies": 1,
    "fraction-evaluate": 1.0,
    "round-timeout": 600.0,
    "model": "cnn",
    "pretrained": False,
    "image-size": 0,
    "weights": "",
    "out": "",
}


def config_from_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``context.run_config`` over :data:`RUN_CONFIG_DEFAULTS` (unknown keys are kept)."""
    return {**RUN_CONFIG_DEFAULTS, **dict(run_config)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train one method on the connected SuperNodes; write ``history.json`` to ``out`` when set."""
    from robustlab.fedld.strategies import make_strategy

    cfg = config_from_run_config(context.run_config)
    n = int(cfg["num-partitions"])
    seed = int(cfg["seed"])
    spec = TaskSpec(
        dataset=str(cfg["dataset"]),
        data_dir=str(cfg["data-dir"]) or None,
        num_partitions=n,
        beta=float(cfg["beta"]),
        seed=seed,
        model=str(cfg["model"]),
        pretrained=bool(cfg["pretrained"]),
        image_size=int(cfg["image-size"]),
        weights=str(cfg["weights"]),
    )
    task = load_task(spec)
    options = {
        "num_clients": n,
        "min_replies": int(cfg["min-replies"]),
        "fraction_evaluate": float(cfg["fraction-evaluate"]),
        "margin_lambda": float(cfg["margin-lambda"]),
        "k_proportion": float(cfg["k-proportion"]),
        "proximal_mu": float(cfg["proximal-mu"]),
        "fedpac_lambda": float(cfg["fedpac-lambda"]),
        "server_lr": float(cfg["server-lr"]),
        "bn_keys": task.batchnorm_keys(),
        "head_keys": task.head_keys(),
        "param_keys": [n for n, _ in task.build_model().named_parameters()],
    }
    strategy = make_strategy(str(cfg["method"]), options)
    train_config = {
        **spec.to_config(),
        "lr": float(cfg["lr"]),
        "momentum": float(cfg["momentum"]),
        "weight-decay": float(cfg["weight-decay"]),
        "batch-size": int(cfg["batch-size"]),
        "local-epochs": int(cfg["local-epochs"]),
    }
    out = str(cfg["out"])

    def on_round(rec: dict[str, Any]) -> None:
        log.warning(
            "round %d: val acc %.4f, test acc %.4f, test bal-acc %.4f",
            rec["round"],
            rec["val"]["accuracy"],
            rec["test"]["accuracy"],
            rec["test"]["balanced_accuracy"],
        )

    _, history = run_training(
        grid,
        strategy,
        task,
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=train_config,
        init_seed=seed,
        round_timeout=float(cfg["round-timeout"]),
        on_round=on_round,
    )
    if out:
        atomic_write_json(Path(out) / "history.json", {"config": cfg, "history": history})
