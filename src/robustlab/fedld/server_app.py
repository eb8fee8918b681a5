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
:func:`robustlab.fedld.config.from_run_config`), trains one method and, when ``out`` is set, checkpoints
every round there and writes the history (see :func:`main`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from robustlab.fedld.protocol import arrays_to_numpy, numpy_to_arrays
from robustlab.fedld.task import Task, load_task
from robustlab.runs import atomic_write_bytes, atomic_write_json, config_hash, to_jsonable

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


def _app_config_record(cfg: Any) -> dict[str, Any]:
    """The settings a deployment run's checkpoint must match to be resumed (what it computes)."""

    from robustlab.fedld.config import RUNTIME_FIELDS

    skip = {*RUNTIME_FIELDS, "methods", "seeds", "out", "checkpoint", "rounds", "round_timeout", "node_wait"}
    return {k: v for k, v in asdict(cfg).items() if k not in skip}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train one method on the connected SuperNodes (settings: ``context.run_config`` over
    :func:`robustlab.fedld.config.run_config_defaults`). With ``out`` set, every round is checkpointed into
    ``out/checkpoint.npz`` (global arrays, strategy state such as SCAFFOLD's ``c`` and FedPAC's
    prototypes, history) and a ServerApp started again with the same settings continues from the last
    finished round; ``out/history.json`` is written at the end."""
    from robustlab.errors import UserError
    from robustlab.fedld.config import from_run_config, to_run_config
    from robustlab.fedld.experiment import _strategy_options, _task_spec, validate_config
    from robustlab.fedld.strategies import make_strategy

    cfg = from_run_config(context.run_config)
    cfg.methods = [cfg.method]
    validate_config(cfg)
    if cfg.method == "fedavg-slr" and cfg.server_lr is None:
        raise UserError("the Flower app cannot match fedavg-slr to a FedLD run", "set server-lr > 0")
    spec = _task_spec(cfg, cfg.first_seed)
    task = load_task(spec)
    options = {**_strategy_options(cfg, task, cfg.server_lr), "fraction_evaluate": cfg.fraction_evaluate}
    strategy = make_strategy(cfg.method, options)
    train_config = {
        **spec.to_config(),
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight-decay": cfg.weight_decay,
        "batch-size": cfg.batch_size,
        "local-epochs": cfg.local_epochs,
        # names the SuperNodes' state-dir subfolder: another method, seed or setting never shares it
        "cell": f"{cfg.method}-{cfg.first_seed}-{config_hash(_app_config_record(cfg))[:12]}",
    }
    out = Path(cfg.out) if cfg.out else None
    checkpoint = None
    if out is not None and cfg.checkpoint:
        record = _app_config_record(cfg)
        stored = out / "run_config.json"
        if stored.exists() and (out / "checkpoint.npz").exists():
            old = json.loads(stored.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            if changed:
                raise UserError(
                    f"{out} holds a checkpoint of a run with other settings ({', '.join(changed)})",
                    "use another out folder, or the same settings to resume",
                )
        atomic_write_json(stored, record)
        checkpoint = Checkpoint(out / "checkpoint.npz")

    def on_round(rec: dict[str, Any]) -> None:
        log.warning(
            "round %d: val acc %.4f, test acc %.4f, test bal-acc %.4f%s",
            rec["round"],
            rec["val"]["accuracy"],
            rec["test"]["accuracy"],
            rec["test"]["balanced_accuracy"],
            f", {int(rec['diagnostics'].get('replies', 0))} replies" if rec.get("diagnostics") else "",
        )

    _, history = run_training(
        grid,
        strategy,
        task,
        num_rounds=cfg.rounds,
        train_config=train_config,
        init_seed=cfg.first_seed,
        round_timeout=cfg.round_timeout,
        checkpoint=checkpoint,
        on_round=on_round,
    )
    if out is not None:
        atomic_write_json(
            out / "history.json", {"config": to_jsonable(to_run_config(cfg)), "history": history}
        )
