"""Faults on Flower's simulation engine: a client that raises or stalls past the round timeout does not
kill the round; with fewer than ``min_replies`` usable replies the round keeps the global model."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr.simulation")
pytest.importorskip("ray")

from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from robustlab.fedld.client_app import app as client_app
from robustlab.fedld.server_app import run_training
from robustlab.fedld.strategies import FedAvg, FedLD
from robustlab.fedld.task import TaskSpec, load_task

SPEC = TaskSpec(dataset="digits", num_partitions=3, beta=1.0, seed=0)


@pytest.fixture(scope="module")
def histories():
    task = load_task(SPEC)
    base = {**SPEC.to_config(), "lr": 0.05}
    results: dict[str, list[dict]] = {}
    errors: list[BaseException] = []
    app = ServerApp()

    @app.main()
    def _main(grid, context):
        try:
            common = {"min_train_nodes": 3, "min_available_nodes": 3, "min_evaluate_nodes": 3}
            # 1) partition 1 raises in round 1; two replies suffice (min_replies=2)
            _, results["raise"] = run_training(
                grid,
                FedLD(min_replies=2, **common),
                task,
                num_rounds=2,
                train_config={
                    **base,
                    "cell": "raise",
                    "fault-partition": 1,
                    "fault-kind": "raise",
                    "fault-rounds": [1],
                },
            )
            # 2) the same fault with min_replies=3: round 1 is skipped, the model is kept
            _, results["skip"] = run_training(
                grid,
                FedAvg(min_replies=3, **common),
                task,
                num_rounds=2,
                train_config={
                    **base,
                    "cell": "skip",
                    "fault-partition": 2,
                    "fault-kind": "raise",
                    "fault-rounds": [1],
                },
            )
            # 3) partition 0 stalls past the round timeout in round 1
            _, results["stall"] = run_training(
                grid,
                FedAvg(min_replies=2, **common),
                task,
                num_rounds=2,
                round_timeout=8.0,
                train_config={
                    **base,
                    "cell": "stall",
                    "fault-partition": 0,
                    "fault-kind": "sleep",
                    "fault-seconds": 16.0,
                    "fault-rounds": [1],
                },
            )
        except BaseException as exc:
            errors.append(exc)

    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    if errors:
        raise errors[0]
    return results


@pytest.mark.integration
@pytest.mark.slow
def test_a_raising_client_does_not_kill_the_round(histories):
    h = histories["raise"]
    assert [r["round"] for r in h] == [0, 1, 2]
    assert h[1]["train"]["replies"] == 2 and h[1]["train"]["failures"] == 1
    assert not h[1]["skipped"]
    assert h[1]["test"]["accuracy"] != h[0]["test"]["accuracy"]  # the model moved
    assert h[2]["train"]["replies"] == 3 and h[2]["train"]["failures"] == 0
    assert np.isfinite(h[1]["diagnostics"]["update-ratio"])


@pytest.mark.integration
@pytest.mark.slow
def test_too_few_replies_keep_the_global_model(histories):
    h = histories["skip"]
    assert h[1]["skipped"] and h[1]["diagnostics"]["replies"] == 2
    assert h[1]["val"] == h[0]["val"] and h[1]["test"] == h[0]["test"]  # same model, same numbers
    assert not h[2]["skipped"] and h[2]["train"]["replies"] == 3


@pytest.mark.integration
@pytest.mark.slow
def test_a_stalled_client_times_out_and_the_round_goes_on(histories):
    h = histories["stall"]
    assert [r["round"] for r in h] == [0, 1, 2]
    assert h[1]["diagnostics"]["replies"] == 2 and not h[1]["skipped"]
    assert h[1]["train_seconds"] >= 8.0 - 0.5  # it waited for the timeout, not for the stalled client
    assert h[1]["test"]["accuracy"] != h[0]["test"]["accuracy"]
