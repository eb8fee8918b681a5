"""Faults on Flower's simulation engine: a client that raises, stalls past the round timeout or sends a
malformed reply does not kill the round; with fewer than ``min_replies`` usable replies the round keeps the
global model; SCAFFOLD's server control variate stays the mean of the clients' through dropped replies and
skipped rounds. A round waits a bounded time for missing SuperNodes (fake grid, no simulation)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr.simulation")
pytest.importorskip("ray")

from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from robustlab.fedld.client_app import app as client_app
from robustlab.fedld.protocol import PENDING_ROUND, SCAFFOLD_C
from robustlab.fedld.server_app import run_training
from robustlab.fedld.strategies import FedAvg, FedLD, Scaffold
from robustlab.fedld.task import TaskSpec, load_task

SPEC = TaskSpec(dataset="digits", num_partitions=3, beta=1.0, seed=0)


@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
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
            # 4) SCAFFOLD: partition 1 replies with a NaN in round 1 (dropped, round aggregated from 2);
            #    in round 2 partition 2 does (min_replies=3: the round is skipped, the model kept)
            for name, fault_pid, fault_round, min_replies in (
                ("scaffold-drop", 1, 1, 2),
                ("scaffold-skip", 2, 2, 3),
            ):
                strategy = Scaffold(min_replies=min_replies, **common)
                state_dir = tmp / name
                _, results[name] = run_training(
                    grid,
                    strategy,
                    task,
                    num_rounds=3,
                    train_config={
                        **base,
                        "cell": name,
                        "client-state-dir": str(state_dir),
                        "fault-partition": fault_pid,
                        "fault-kind": "malformed",
                        "fault-rounds": [fault_round],
                    },
                )
                results[name + "-state"] = (strategy.state_dict(), state_dir)
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


def _committed_client_controls(state: dict, state_dir) -> list[dict[str, np.ndarray]]:
    """Each client's c_i as it stands after the last round: its newest state file's committed c_i, or its
    pending one when the server applied that change (what the client will commit at its next round)."""
    accepted = state[Scaffold.ACCEPTED]
    out = []
    for pid in range(3):
        newest = max(state_dir.glob(f"p{pid}_r*.npz"), key=lambda p: int(p.stem.rpartition("_r")[2]))
        with np.load(newest) as z:
            groups: dict[str, dict[str, np.ndarray]] = {}
            for name in z.files:
                g, k = name.split("::", 1)
                groups.setdefault(g, {})[k] = z[name]
        pending = groups.get("scaffold-ci-pending", {})
        ci = groups.get("scaffold-ci", {})
        if pending and int(pending.pop(PENDING_ROUND)[0]) == int(accepted[pid]):
            ci = pending
        out.append(ci)
    return out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", ["scaffold-drop", "scaffold-skip"])
def test_malformed_reply_is_dropped_and_scaffold_control_stays_the_clients_mean(histories, name):
    h = histories[name]
    assert [r["round"] for r in h] == [0, 1, 2, 3]
    faulty = 1 if name == "scaffold-drop" else 2
    assert h[faulty]["diagnostics"]["malformed"] == 1 and h[faulty]["diagnostics"]["replies"] == 2
    assert all(np.isfinite(r["test"]["loss"]) for r in h)
    if name == "scaffold-drop":
        assert not h[1]["skipped"] and h[1]["test"] != h[0]["test"]
    else:
        assert h[2]["skipped"] and h[2]["test"] == h[1]["test"]  # model kept ...
    state, state_dir = histories[name + "-state"]
    control = {k[len(SCAFFOLD_C) :]: v for k, v in state.items() if k.startswith(SCAFFOLD_C)}
    clients = _committed_client_controls(state, state_dir)
    assert control and all(set(c) == set(control) for c in clients)
    for k, c in control.items():  # ... while c = (1/N) sum_i c_i over all N = 3 clients holds throughout
        np.testing.assert_allclose(c, np.mean([ci[k] for ci in clients], axis=0), rtol=1e-4, atol=1e-6)
    assert int(state[Scaffold.ACCEPTED][faulty]) != faulty  # the dropped change was not applied


class _FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_a_lost_supernode_delays_the_round_a_bounded_time_then_it_goes_on(caplog):
    import time

    s = FedAvg(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3, node_wait=1.5)
    assert s.min_nodes == 2  # default: half of the expected nodes, rounded up
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="robustlab.fedld"):
        assert sorted(s.available_nodes(_FakeGrid([11, 12]), 4)) == [11, 12]
    assert 1.4 <= time.monotonic() - t0 < 5
    assert "2 of 3 SuperNodes connected" in caplog.text and "going on" in caplog.text
    # Flower's own sampling runs with its minimums lowered to the nodes present (so it does not block)
    seen = s._with_present_nodes(_FakeGrid([11, 12]), 4, lambda: [(s.min_available_nodes, s.min_train_nodes)])
    assert seen == [(2, 2)] and s.last_diagnostics["nodes"] == 2
    assert (s.min_available_nodes, s.min_train_nodes) == (3, 3)  # restored
    strict = FedAvg(min_available_nodes=3, min_train_nodes=3, min_nodes=3, node_wait=0.2)
    with caplog.at_level("WARNING", logger="robustlab.fedld"):
        assert strict.available_nodes(_FakeGrid([11, 12]), 5) == []
    assert "skipping the round" in caplog.text
    assert strict._with_present_nodes(_FakeGrid([11, 12]), 5, lambda: ["never called"]) == []
    t0 = time.monotonic()
    assert len(strict.available_nodes(_FakeGrid([1, 2, 3]), 6)) == 3 and time.monotonic() - t0 < 0.1
