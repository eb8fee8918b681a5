"""Every registered strategy's server update on fixed replies, bit for bit.

For each method: three rounds of ``configure_train`` -> replies (four clients, arriving out of partition
order; in round 2 one reply is malformed and must be dropped) -> ``aggregate_train``. The new global arrays
must equal, with ``np.array_equal`` and the same dtype, the method's update rule computed here from the
pure functions of :mod:`robustlab.fedld.aggregation` (or Flower's ``aggregate_arrayrecords`` for the
model-averaging methods) on the replies in partition order. This pins the arithmetic (float32 deltas,
float64 aggregation, the cast back, the reply order) so that restructuring the strategies cannot change a
committed result.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr.app")
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from robustlab.fedld.aggregation import (
    gradient_harmonize,
    mean_delta,
    principal_gradient_aggregate,
    scaffold_server_control,
    update_history,
)
from robustlab.fedld.protocol import (
    FEDPAC_COUNT,
    FEDPAC_H,
    FEDPAC_PROTO,
    FEDPAC_V,
    SCAFFOLD_DC,
    arrays_to_numpy,
    numpy_to_arrays,
)
from robustlab.fedld.strategies import STRATEGIES, make_strategy

HEAD = ["head.weight", "head.bias"]
PARAMS = ["body.weight", "body.bias", "head.weight", "head.bias"]
SIZES = [12, 40, 25, 7]
ARRIVAL = [2, 0, 3, 1]  # partition ids in the order the replies arrive
SERVER_LR = 0.37
MODEL_MEAN = {"fedavg", "fedprox", "moon", "fedbn", "fedld-margin"}  # Flower's weighted model average


pytestmark = pytest.mark.usefixtures("task_identity")


class Grid:
    def get_node_ids(self):
        return [11, 12, 13, 14]


def initial_global(rng):
    return {
        "body.weight": rng.normal(size=(6, 5)).astype(np.float32),
        "body.bias": rng.normal(size=(6,)).astype(np.float32),
        "bn.running_mean": rng.normal(size=(6,)).astype(np.float32),
        "bn.num_batches_tracked": np.array(5, np.int64),
        "head.weight": rng.normal(size=(3, 6)).astype(np.float32),
        "head.bias": rng.normal(size=(3,)).astype(np.float32),
    }


def client_reply(rng, g, pid, method):
    model = {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(v.dtype) for k, v in g.items()}
    model["bn.num_batches_tracked"] = np.array(int(g["bn.num_batches_tracked"]) + 3 + pid, np.int64)
    if method == "scaffold":
        for k in PARAMS:
            model[SCAFFOLD_DC + k] = rng.normal(scale=0.01, size=g[k].shape).astype(np.float32)
    if method == "fedpac":
        counts = rng.integers(1, 6, size=3).astype(np.float64)
        model |= {
            FEDPAC_V: np.array([rng.uniform(0.5, 2.0)]),
            FEDPAC_H: 0.3 * rng.normal(size=(3, 6)),
            FEDPAC_PROTO: rng.normal(size=(3, 6)),
            FEDPAC_COUNT: counts,
        }
    return model


def options():
    return {
        "num_clients": 4,
        "server_lr": SERVER_LR,
        "k_proportion": 0.75,
        "bn_keys": ["bn.running_mean", "bn.num_batches_tracked"],
        "head_keys": HEAD,
        "param_keys": PARAMS,
        "node_wait": 0.0,
    }


def expected_update(method, g, models, weights, history):
    """The method's new global arrays from the replies in partition order (returns it and FedGH's history)."""
    keys = list(g)
    if method in MODEL_MEAN:
        contents = [
            RecordDict(
                {
                    "arrays": numpy_to_arrays(m),
                    "metrics": MetricRecord({"num-examples": int(w)}),
                }
            )
            for m, w in zip(models, weights, strict=True)
        ]
        new = arrays_to_numpy(aggregate_arrayrecords(contents, "num-examples"))
    elif method == "fedpac":
        new = mean_delta([{k: m[k] for k in keys} for m in models], weights)
    else:
        deltas = [{k: m[k] - g[k] for k in keys} for m in models]
        lr = 1.0
        if method == "fedavg-unweighted":
            update = mean_delta(deltas)
        elif method == "fedavg-slr":
            update = mean_delta(deltas, weights)
            lr = SERVER_LR
        elif method == "scaffold":  # server lr 1
            update = mean_delta(deltas, weights)
        elif method in ("fedld", "fedld-pg"):
            update = principal_gradient_aggregate(deltas, k_proportion=0.75)
        elif method == "fedgh":
            update = gradient_harmonize(deltas, history=history)
            history = update_history(history, update)
        else:  # pragma: no cover - a new method must be added here
            raise AssertionError(method)
        new = {k: g[k].astype(np.float64) + lr * np.asarray(update[k], np.float64) for k in keys}
    out = {}
    for k in keys:
        if np.issubdtype(g[k].dtype, np.integer):
            out[k] = np.rint(new[k]).astype(g[k].dtype)
        else:
            out[k] = np.asarray(new[k], dtype=g[k].dtype)
    return out, history


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_server_update_is_the_methods_rule_bit_for_bit(method):
    rng = np.random.default_rng(7)
    g = initial_global(rng)
    strategy = make_strategy(method, options())
    history = None
    control = {k: np.zeros_like(g[k]) for k in PARAMS}
    for rnd in (1, 2, 3):
        msgs = list(strategy.configure_train(rnd, numpy_to_arrays(g), ConfigRecord(), Grid()))
        assert len(msgs) == 4
        replies, kept = [], {}
        for msg, pid in zip(msgs, ARRIVAL, strict=True):
            model = client_reply(rng, g, pid, method)
            if rnd == 2 and pid == 3:  # malformed: a non-finite entry; dropped with a warning
                model["body.bias"] = np.full_like(model["body.bias"], np.nan)
            else:
                kept[pid] = model
            metrics = MetricRecord({"num-examples": SIZES[pid], "train-loss": 0.5 + pid, "partition-id": pid})
            content = RecordDict({"arrays": numpy_to_arrays(model), "metrics": metrics})
            replies.append(Message(content, reply_to=msg))
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        order = sorted(kept)
        models = [kept[p] for p in order]
        weights = [float(SIZES[p]) for p in order]
        expect, history = expected_update(method, g, models, weights, history)
        got = arrays_to_numpy(arrays)
        assert list(got) == list(g)
        for k in g:
            assert got[k].dtype == g[k].dtype, (method, rnd, k)
            assert np.array_equal(got[k], expect[k]), (method, rnd, k)
        assert metrics["replies"] == len(models) and metrics["malformed"] == (1.0 if rnd == 2 else 0.0)
        if method == "scaffold":
            dcs = [{k: m[SCAFFOLD_DC + k] for k in PARAMS} for m in models]
            control = {k: v.astype(np.float32) for k, v in scaffold_server_control(control, dcs, 4).items()}
            state = strategy.state_dict()
            for k in PARAMS:
                assert np.array_equal(state["scaffold-c::" + k], control[k]), (rnd, k)
        if method in ("fedld", "fedld-pg"):
            deltas = [{k: m[k] - g[k] for k in g} for m in models]
            update = principal_gradient_aggregate(deltas, k_proportion=0.75)
            num = np.concatenate([np.ravel(update[k]).astype(np.float64) for k in PARAMS])
            fedavg = mean_delta([{k: d[k] for k in PARAMS} for d in deltas], weights)
            den = np.concatenate([np.ravel(fedavg[k]).astype(np.float64) for k in PARAMS])
            assert metrics["update-ratio"] == pytest.approx(
                np.linalg.norm(num) / np.linalg.norm(den), rel=1e-6
            )
        g = got


def test_a_custom_aggregator_plugs_into_the_delta_strategy():
    """The documented extension point: ``DeltaStrategy(MyAggregator(), server_lr=...)`` applies
    ``w + server_lr * A(deltas)``; the reply filter still drops a malformed reply first."""
    from robustlab.fedld.strategies import Aggregator, DeltaStrategy

    class Median(Aggregator):
        description = "coordinate-wise median of the deltas"

        def update(self, deltas, weights):
            return {k: np.median([d[k] for d in deltas], axis=0) for k in deltas[0]}

    rng = np.random.default_rng(3)
    g = initial_global(rng)
    strategy = DeltaStrategy(Median(), server_lr=0.5, min_available_nodes=4, node_wait=0.0)
    msgs = list(strategy.configure_train(1, numpy_to_arrays(g), ConfigRecord(), Grid()))
    models = [client_reply(rng, g, pid, "fedavg") for pid in range(4)]
    models[1]["head.bias"] = np.full_like(models[1]["head.bias"], np.inf)
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": numpy_to_arrays(m),
                    "metrics": MetricRecord({"num-examples": 5, "partition-id": pid}),
                }
            ),
            reply_to=msg,
        )
        for pid, (msg, m) in enumerate(zip(msgs, models, strict=True))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = arrays_to_numpy(arrays)
    kept = [models[i] for i in (0, 2, 3)]
    for k in ("body.weight", "head.bias"):
        median = np.median([m[k] - g[k] for m in kept], axis=0)
        np.testing.assert_allclose(got[k], g[k] + 0.5 * median, rtol=1e-6)
    assert got["bn.num_batches_tracked"].dtype == np.int64
    assert metrics["malformed"] == 1.0 and metrics["replies"] == 3.0
