"""Strategies on constructed Flower messages (no simulation): each aggregate is checked against an
independent numpy computation of the method's formula."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

flwr_app = pytest.importorskip("flwr.app")
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg  # noqa: E402

from robustlab.fedld import (  # noqa: E402
    MOON,
    FedAvg,
    FedAvgServerLR,
    FedAvgUnweighted,
    FedBN,
    FedGH,
    FedLD,
    FedLDAggregationOnly,
    FedLDMarginOnly,
    FedProx,
    Scaffold,
)
from robustlab.fedld.protocol import SCAFFOLD_C, SCAFFOLD_DC, arrays_to_numpy, numpy_to_arrays  # noqa: E402
from robustlab.fedld.strategies import evaluate_metrics_aggregate  # noqa: E402

pytestmark = pytest.mark.usefixtures("task_identity")


class FakeGrid:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def global_model(rng):
    return {
        "conv.weight": rng.normal(size=(4, 3, 3)).astype(np.float32),
        "fc.bias": rng.normal(size=(5,)).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 1.5, size=(4,)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def client_models(rng, g, m):
    out = []
    for _ in range(m):
        c = {
            k: (v + rng.normal(scale=0.1, size=v.shape)).astype(v.dtype)
            for k, v in g.items()
            if v.dtype != np.int64
        }
        c["bn.num_batches_tracked"] = np.array(7 + int(rng.integers(3, 6)), dtype=np.int64)
        out.append(c)
    return out


def round_trip(strategy, g, models, sizes, errors=0, server_round=1, partition_ids=None):
    """configure_train -> replies (models, sizes; plus `errors` error replies) -> aggregate_train.
    The replies carry partition ids (default: list order), as this project's ClientApp's replies do."""
    grid = FakeGrid(len(models) + errors)
    msgs = list(strategy.configure_train(server_round, numpy_to_arrays(g), ConfigRecord(), grid))
    ids = [{"partition-id": int(p)} for p in (range(len(models)) if partition_ids is None else partition_ids)]
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": numpy_to_arrays(mod),
                    "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, **pid}),
                }
            ),
            reply_to=msg,
        )
        for msg, mod, n, pid in zip(msgs, models, sizes, ids, strict=False)
    ]
    replies += [Message(Error(code=1, reason="client crashed"), reply_to=msgs[-1]) for _ in range(errors)]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return msgs, (arrays_to_numpy(arrays) if arrays is not None else None), metrics


def reference_pg(deltas, k_proportion=0.8):
    """FedLD's closed form via a full numpy SVD of the m x d delta matrix (brief section 1.3)."""
    out = {}
    for key in deltas[0]:
        stack = np.stack([np.asarray(d[key], np.float64).ravel() for d in deltas])
        if np.issubdtype(deltas[0][key].dtype, np.integer) or stack.shape[1] < 2:
            out[key] = stack.mean(0)
            continue
        m = stack.shape[0]
        k = int(m * k_proportion)
        _, s, vt = np.linalg.svd(stack, full_matrices=False)
        w = s**2 / (s**2).sum()
        g = np.zeros(stack.shape[1])
        for i in range(m):
            for j in range(k):
                g += np.linalg.norm(stack[i]) * np.sign(stack[i] @ vt[j]) * w[j] * vt[j]
        out[key] = g / m
    return out


def test_fedavg_equals_flowers_fedavg_and_keeps_integer_dtype():
    rng = np.random.default_rng(0)
    g = global_model(rng)
    models = client_models(rng, g, 3)
    sizes = [10, 30, 60]
    _, ours, _ = round_trip(FedAvg(), g, models, sizes)
    flower = FlowerFedAvg()
    msgs = list(flower.configure_train(1, numpy_to_arrays(g), ConfigRecord(), FakeGrid(3)))
    replies = [
        Message(
            RecordDict({"arrays": numpy_to_arrays(m), "metrics": MetricRecord({"num-examples": n})}),
            reply_to=q,
        )
        for q, m, n in zip(msgs, models, sizes, strict=True)
    ]
    theirs = arrays_to_numpy(flower.aggregate_train(1, replies)[0])
    p = np.array(sizes) / sum(sizes)
    for k in g:
        expected = sum(pi * mod[k].astype(np.float64) for pi, mod in zip(p, models, strict=True))
        if g[k].dtype == np.int64:
            expected = np.rint(expected)
        np.testing.assert_allclose(ours[k], expected, rtol=1e-5, atol=1e-6)
        if g[k].dtype != np.int64:
            np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
        assert ours[k].dtype == g[k].dtype
    assert ours["bn.num_batches_tracked"] == np.rint(theirs["bn.num_batches_tracked"])


def test_unweighted_and_server_lr_controls():
    rng = np.random.default_rng(1)
    g = global_model(rng)
    models = client_models(rng, g, 4)
    sizes = [5, 10, 20, 65]
    _, unw, _ = round_trip(FedAvgUnweighted(), g, models, sizes)
    _, slr, _ = round_trip(FedAvgServerLR(server_lr=0.3), g, models, sizes)
    p = np.array(sizes) / sum(sizes)
    for k in ("conv.weight", "fc.bias", "bn.running_var"):
        np.testing.assert_allclose(unw[k], np.mean([m[k] for m in models], axis=0), rtol=1e-5, atol=1e-6)
        weighted = sum(pi * m[k].astype(np.float64) for pi, m in zip(p, models, strict=True))
        np.testing.assert_allclose(slr[k], g[k] + 0.3 * (weighted - g[k]), rtol=1e-5, atol=1e-6)


def test_server_lr_survives_a_restart_and_wins_over_a_new_match():
    rng = np.random.default_rng(11)
    g = global_model(rng)
    models = client_models(rng, g, 3)
    sizes = [4, 8, 12]
    started = FedAvgServerLR(server_lr=0.3)
    # resumed with a different matched lr (its FedLD run was extended): the checkpointed 0.3 is used
    resumed = FedAvgServerLR(server_lr=0.9)
    resumed.load_state_dict(started.state_dict())
    _, a, _ = round_trip(started, g, models, sizes)
    _, b, _ = round_trip(resumed, g, models, sizes)
    for k in g:
        np.testing.assert_array_equal(a[k], b[k])
    old_checkpoint = FedAvgServerLR(server_lr=0.9)
    old_checkpoint.load_state_dict({})  # written before the lr was checkpointed: keeps its own
    assert old_checkpoint.server_lr == 0.9
    with pytest.raises(ValueError, match="server-lr"):
        resumed.load_state_dict({"scaffold-c::w": np.zeros(2)})


def test_fedld_matches_svd_closed_form_and_logs_ratio():
    rng = np.random.default_rng(2)
    g = global_model(rng)
    models = client_models(rng, g, 5)
    sizes = [10, 20, 30, 40, 50]
    strategy = FedLD()
    msgs, out, metrics = round_trip(strategy, g, models, sizes)
    assert msgs[0].content["config"]["margin-lambda"] == pytest.approx(0.1)
    deltas = [{k: m[k] - g[k] for k in g} for m in models]
    ref = reference_pg(deltas)
    for k in ("conv.weight", "fc.bias", "bn.running_var"):
        np.testing.assert_allclose(out[k], g[k] + ref[k].reshape(g[k].shape), rtol=1e-4, atol=1e-6)
    # the diagnostic: ||g_LD|| / ||weighted FedAvg update|| and their cosine, over the parameters
    # (BatchNorm running statistics excluded), and over every float entry
    p = np.array(sizes) / sum(sizes)

    def ratio_cos(keys):
        a = np.concatenate([ref[k].ravel() for k in keys])
        b = np.concatenate(
            [sum(pi * d[k].astype(np.float64) for pi, d in zip(p, deltas, strict=True)).ravel() for k in keys]
        )
        return np.linalg.norm(a) / np.linalg.norm(b), a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    r, c = ratio_cos(("conv.weight", "fc.bias"))
    assert metrics["update-ratio"] == pytest.approx(r, rel=1e-4)
    assert metrics["update-cosine"] == pytest.approx(c, rel=1e-4)
    r_all, c_all = ratio_cos(("conv.weight", "fc.bias", "bn.running_var"))
    assert metrics["update-ratio-all-entries"] == pytest.approx(r_all, rel=1e-4)
    assert metrics["update-cosine-all-entries"] == pytest.approx(c_all, rel=1e-4)
    assert r != pytest.approx(r_all, rel=1e-3)
    assert strategy.last_diagnostics["update-ratio"] == metrics["update-ratio"]


def test_fedld_ablations_configure_the_clients():
    rng = np.random.default_rng(3)
    g = global_model(rng)
    models = client_models(rng, g, 3)
    msgs_pg, out_pg, _ = round_trip(FedLDAggregationOnly(), g, models, [1, 1, 1])
    _, out_ld, _ = round_trip(FedLD(), g, models, [1, 1, 1])
    assert msgs_pg[0].content["config"]["margin-lambda"] == 0.0
    for k in g:  # same server side
        np.testing.assert_array_equal(out_pg[k], out_ld[k])
    msgs_m, out_m, _ = round_trip(FedLDMarginOnly(margin_lambda=0.2), g, models, [1, 2, 3])
    _, out_avg, _ = round_trip(FedAvg(), g, models, [1, 2, 3])
    assert msgs_m[0].content["config"]["margin-lambda"] == pytest.approx(0.2)
    for k in g:
        np.testing.assert_array_equal(out_m[k], out_avg[k])
    msgs_p, _, _ = round_trip(FedProx(proximal_mu=0.05), g, models, [1, 2, 3])
    assert msgs_p[0].content["config"]["proximal-mu"] == pytest.approx(0.05)
    msgs_moon, _, _ = round_trip(MOON(mu=5.0), g, models, [1, 2, 3])
    assert msgs_moon[0].content["config"]["local-algorithm"] == "moon"
    assert msgs_moon[0].content["config"]["moon-mu"] == 5.0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), perm_seed=st.integers(0, 10_000))
def test_fedld_does_not_depend_on_reply_order(seed, perm_seed):
    rng = np.random.default_rng(seed)
    g = global_model(rng)
    models = client_models(rng, g, 5)
    sizes = [int(x) for x in rng.integers(1, 100, size=5)]
    order = np.random.default_rng(perm_seed).permutation(5)
    _, a, _ = round_trip(FedLD(), g, models, sizes)
    _, b, _ = round_trip(FedLD(), g, [models[i] for i in order], [sizes[i] for i in order])
    for k in g:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [FedAvg, FedGH, FedLD], ids=lambda c: c.__name__)
def test_aggregation_is_bitwise_independent_of_reply_order(make):
    """Replies arrive in completion order; with partition ids the result must not depend on it at all
    (float32 sums and FedGH's pairing are order-sensitive), so a rerun or a resumed run repeats itself."""
    rng = np.random.default_rng(11)
    g = global_model(rng)
    models = client_models(rng, g, 5)
    sizes = [5, 17, 3, 40, 9]
    order = [3, 0, 4, 1, 2]
    _, a, metrics = round_trip(make(), g, models, sizes)
    _, b, _ = round_trip(
        make(), g, [models[i] for i in order], [sizes[i] for i in order], partition_ids=order
    )
    for k in g:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert "partition-id" not in metrics  # an identifier is not averaged into the round's metrics


def test_failed_clients_are_dropped_and_min_replies_keeps_the_model():
    rng = np.random.default_rng(4)
    g = global_model(rng)
    models = client_models(rng, g, 3)
    _, clean, _ = round_trip(FedLD(), g, models, [3, 4, 5])
    strategy = FedLD()
    _, with_errors, metrics = round_trip(strategy, g, models, [3, 4, 5], errors=2)
    for k in g:
        np.testing.assert_array_equal(clean[k], with_errors[k])
    assert metrics["failures"] == 2 and metrics["replies"] == 3
    strict = FedAvg(min_replies=4)
    _, out, metrics = round_trip(strict, g, models, [3, 4, 5], errors=1)
    assert out is None and metrics is None
    assert strict.skipped_rounds == [1]


def test_scaffold_server_control_is_mean_of_client_changes_and_survives_state_round_trip():
    rng = np.random.default_rng(5)
    g = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    strategy = Scaffold()
    models, dcs = [], []
    for _ in range(4):
        m = {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in g.items()}
        dc = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
        dcs.append(dc)
        models.append({**m, **{SCAFFOLD_DC + k: v for k, v in dc.items()}})
    sizes = [1, 2, 3, 4]
    msgs, out, _ = round_trip(strategy, g, models, sizes)
    assert not any(k.startswith(SCAFFOLD_C) for k in msgs[0].content["arrays"])  # no control before round 1
    assert set(out) == set(g)  # control entries never leak into the global model
    p = np.array(sizes) / 10
    for k in g:
        np.testing.assert_allclose(
            out[k], sum(pi * m[k].astype(np.float64) for pi, m in zip(p, models, strict=True)), rtol=1e-5
        )
        np.testing.assert_allclose(
            strategy.control[k], np.mean([d[k] for d in dcs], axis=0), rtol=1e-5, atol=1e-6
        )
    restored = Scaffold()
    restored.load_state_dict(strategy.state_dict())
    msgs2 = list(restored.configure_train(2, numpy_to_arrays(g), ConfigRecord(), FakeGrid(4)))
    sent = msgs2[0].content["arrays"]
    for k in g:
        np.testing.assert_array_equal(sent[SCAFFOLD_C + k].numpy(), strategy.control[k])


def test_fedgh_first_round_is_mean_then_uses_history():
    rng = np.random.default_rng(6)
    g = {"w": np.zeros(6, np.float32)}
    a = {"w": np.array([1, 0, 0, 0, 0, 0], np.float32)}
    b = {"w": np.array([-1, 1, 0, 0, 0, 0], np.float32)}
    strategy = FedGH()
    _, out1, _ = round_trip(strategy, g, [a, b], [1, 1])
    np.testing.assert_allclose(out1["w"], (a["w"] + b["w"]) / 2, atol=1e-7)
    state = strategy.state_dict()
    assert set(state) == {"fedgh-history::w"}
    # round 2: the pair conflicts (<a,b> = -1): the official last step projects a on b's normal plane,
    # then corrects b along the projected a with the original inner product; sum / m (hand computed)
    _, out2, _ = round_trip(strategy, g, [a, b], [1, 1], server_round=2)
    ga, gb = a["w"].astype(np.float64), b["w"].astype(np.float64)
    pa = ga - (ga @ gb) / (gb @ gb + 1e-7) * gb
    pb = gb - (ga @ gb) / (pa @ pa + 1e-7) * pa
    np.testing.assert_allclose(out2["w"], (pa + pb) / 2, rtol=1e-5, atol=1e-6)
    del rng


def test_fedbn_sends_local_keys_and_requires_them():
    rng = np.random.default_rng(7)
    g = global_model(rng)
    keys = ["bn.running_var", "bn.num_batches_tracked"]
    msgs, _, _ = round_trip(FedBN(local_keys=keys), g, client_models(rng, g, 2), [1, 1])
    assert sorted(msgs[0].content["config"]["local-keys"]) == sorted(keys)
    with pytest.raises(ValueError):
        FedBN(local_keys=[])


def test_evaluate_aggregate_reports_weighted_unweighted_and_per_client():
    recs = [
        RecordDict({"m": MetricRecord({"num-examples": n, "accuracy": a, "loss": 1.0, "partition-id": p})})
        for n, a, p in [(30, 0.9, 1), (10, 0.5, 0)]
    ]
    out = evaluate_metrics_aggregate(recs, "num-examples")
    assert out["accuracy"] == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)
    assert out["accuracy-unweighted"] == pytest.approx(0.7)
    assert out["client-accuracy"] == [0.5, 0.9]  # partition order
    assert out["client-partition"] == [0, 1]


def test_evaluate_aggregate_pools_the_clients_counts():
    """Balanced accuracy and validation accuracy over the union of the clients' shares, from counts."""
    rows = [  # (test correct per class, test count per class, val correct, val examples)
        ([3, 0, 1], [4, 0, 2], 5, 7),
        ([1, 2, 0], [1, 4, 0], 0, 3),
    ]
    recs = [
        RecordDict(
            {
                "m": MetricRecord(
                    {
                        "num-examples": sum(cnt),
                        "accuracy": sum(cor) / sum(cnt),
                        "loss": 1.0,
                        "partition-id": p,
                        "test-class-correct": cor,
                        "test-class-count": cnt,
                        "val-correct": vc,
                        "val-examples": vn,
                    }
                )
            }
        )
        for p, (cor, cnt, vc, vn) in enumerate(rows)
    ]
    out = evaluate_metrics_aggregate(recs, "num-examples")
    # pooled recall per class: 4/5, 2/4, 1/2 -> their mean; pooled accuracy 7/11 (the weighted mean)
    assert out["balanced-accuracy"] == pytest.approx((4 / 5 + 2 / 4 + 1 / 2) / 3)
    assert out["accuracy"] == pytest.approx(7 / 11)
    assert out["val-accuracy"] == pytest.approx(5 / 10)


def test_package_exports_are_lazy_and_complete():
    import subprocess
    import sys

    code = (
        "import sys, robustlab.fedld, robustlab.fedld.cli\n"
        "assert not {'flwr', 'torch', 'ray'} & set(sys.modules), sorted({'flwr', 'torch', 'ray'} & set(sys.modules))\n"
        "from robustlab.fedld import FedLD, FedAvg, MOON, Scaffold, FedPAC, STRATEGIES\n"
        "from flwr.serverapp.strategy import FedAvg as F\n"
        "assert issubclass(FedLD, F) and issubclass(MOON, F) and issubclass(Scaffold, F)\n"
        "assert issubclass(FedPAC, F)\n"
        "print(len(STRATEGIES))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "12"
