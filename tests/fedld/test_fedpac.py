"""FedPAC end to end: the client's alignment term and two-phase update against hand computations, the
strategy's aggregation against an independent solve, the personalised heads' round trip (server -> client
-> disk -> restarted client), and a short run on Flower's simulation engine that is killed and resumed."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

pytest.importorskip("flwr.app")
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from robustlab.fedld import client_app
from robustlab.fedld.losses import fedpac_alignment_loss
from robustlab.fedld.protocol import (
    FEDPAC_COUNT,
    FEDPAC_GLOBAL_COUNT,
    FEDPAC_GLOBAL_PROTO,
    FEDPAC_H,
    FEDPAC_HEAD,
    FEDPAC_PROTO,
    FEDPAC_V,
    arrays_to_numpy,
    numpy_to_arrays,
)
from robustlab.fedld.server_app import Checkpoint, run_training
from robustlab.fedld.strategies import FedPAC, evaluate_metrics_aggregate, make_strategy
from robustlab.fedld.task import TaskSpec, load_task

SPEC = TaskSpec(dataset="digits", num_partitions=3, beta=1.0, seed=0, min_partition_size=10)
ALL3 = {"min_train_nodes": 3, "min_available_nodes": 3, "min_evaluate_nodes": 3}


@pytest.fixture(autouse=True)
def _setup(task_identity):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return load_task(SPEC)


def context(pid: int, node_id: int | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=node_id if node_id is not None else pid + 1,
        node_config={"partition-id": pid, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


# --------------------------------------------------------------------------- client


def test_alignment_term_equals_hand_computation():
    z = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0], [-2.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])
    glob = torch.tensor([[0.0, 1.0], [9.0, 9.0], [1.0, 1.0]])
    present = torch.tensor([True, False, True])  # the server has no prototype of class 1
    local = torch.tensor([[5.0, 5.0], [2.0, 1.0], [7.0, 7.0]])
    loss = fedpac_alignment_loss(z, y, glob, present, local)
    # targets: class 0 -> global (0, 1); class 2 -> global (1, 1); class 1 -> the client's own (2, 1)
    sq = [
        (1 - 0) ** 2 + (2 - 1) ** 2,
        (0.5 - 1) ** 2 + (-1 - 1) ** 2,
        (3 - 2) ** 2 + (0 - 1) ** 2,
        (-3) ** 2 + 0,
    ]
    assert float(loss.detach()) == pytest.approx(sum(sq) / 8)  # nn.MSELoss: mean over all B * d entries
    loss.backward()  # the gradient flows into the features only, 2 (z - c) / (B d)
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(z.grad, 2 * (z.detach() - target) / 8)


def test_client_update_is_head_step_then_aligned_body_step(task):
    """One full-batch step per phase (plain SGD), written out by hand, including the statistics, the
    prototypes before and after, and the head kept in context.state."""
    torch.manual_seed(7)
    model = task.build_model()
    start = copy.deepcopy(model.state_dict())
    head_keys = task.head_keys()
    pid, lam, lr, head_lr = 1, 0.7, 0.05, 0.2
    rng = np.random.default_rng(0)
    gprotos = rng.normal(size=(task.num_classes, 128))
    gcounts = np.ones(task.num_classes)
    gcounts[3] = 0.0  # class 3: no global prototype -> the client's own (pre-training) prototype
    cfg = {
        **SPEC.to_config(),
        "server-round": 2,
        "local-algorithm": "fedpac",
        "fedpac-lambda": lam,
        "fedpac-head-keys": head_keys,
        "fedpac-head-lr": head_lr,
        "lr": lr,
        "momentum": 0.0,
        "weight-decay": 0.0,
        "batch-size": 10_000,
    }
    arrays = ArrayRecord({k: v.detach().clone() for k, v in start.items()})
    arrays[FEDPAC_GLOBAL_PROTO] = numpy_to_arrays({"p": gprotos})["p"]
    arrays[FEDPAC_GLOBAL_COUNT] = numpy_to_arrays({"c": gcounts})["c"]
    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(cfg)}), dst_node_id=1, message_type="train"
    )
    ctx = context(pid)
    reply = client_app.train(msg, ctx)
    out = arrays_to_numpy(reply.content["arrays"])

    # by hand
    idx = torch.as_tensor(task.partitions[pid])
    x, y = task.x_train[idx], task.y_train[idx]
    model.eval()
    with torch.no_grad():
        z0 = model.features(x).double()
    local = torch.zeros(task.num_classes, z0.shape[1], dtype=torch.float64)
    for c in y.unique().tolist():
        local[c] = z0[y == c].mean(0)
    model.train()
    head = [p for n, p in model.named_parameters() if n in head_keys]
    body = [p for n, p in model.named_parameters() if n not in head_keys]
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), head)
    with torch.no_grad():
        for p, g in zip(head, grads, strict=True):
            p -= head_lr * g
    z = model.features(x)
    target = torch.stack(
        [torch.from_numpy(gprotos[c]) if gcounts[c] > 0 else local[c] for c in y.tolist()]
    ).float()
    loss = torch.nn.functional.cross_entropy(model.head(z), y) + lam * ((z - target) ** 2).mean()
    grads = torch.autograd.grad(loss, body)
    with torch.no_grad():
        for p, g in zip(body, grads, strict=True):
            p -= lr * g
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(
            out[k].astype(np.float64), v.double().numpy(), atol=2e-5, rtol=1e-4, err_msg=k
        )
    assert reply.content["metrics"]["local-steps"] == 2

    # statistics of the starting model, prototypes and counts of the trained one (official definitions)
    y_np, z0_np = y.numpy(), z0.numpy()
    n = len(y_np)
    h = np.zeros((task.num_classes, z0_np.shape[1]))
    v = 0.0
    for c in np.unique(y_np):
        f = z0_np[y_np == c]
        p_c, mu = len(f) / n, f.mean(0)
        h[c] = p_c * mu
        v += p_c * np.trace(f.T @ f / len(f)) - p_c**2 * (mu @ mu)
    np.testing.assert_allclose(out[FEDPAC_H], h, rtol=1e-6, atol=1e-9)
    assert float(out[FEDPAC_V][0]) == pytest.approx(v / n, rel=1e-6)
    model.eval()
    with torch.no_grad():
        z1 = model.features(x).double().numpy()
    counts = np.bincount(y_np, minlength=task.num_classes)
    np.testing.assert_array_equal(out[FEDPAC_COUNT], counts)
    for c in range(task.num_classes):
        expect = z1[y_np == c].mean(0) if counts[c] else np.zeros(z1.shape[1])
        np.testing.assert_allclose(out[FEDPAC_PROTO][c], expect, atol=2e-5)
    # the client keeps its trained head until the server sends the combined one
    for k in head_keys:
        np.testing.assert_array_equal(ctx.state["fedpac-head"][k].numpy(), out[k])


def test_first_round_has_no_alignment_and_starts_from_the_stored_head(task):
    torch.manual_seed(8)
    start = copy.deepcopy(task.build_model().state_dict())
    cfg = {**SPEC.to_config(), "local-algorithm": "fedpac", "fedpac-head-keys": task.head_keys()}

    def train(lam, ctx, state=start):
        arrays = ArrayRecord({k: v.detach().clone() for k, v in state.items()})
        msg = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({**cfg, "fedpac-lambda": lam})}),
            dst_node_id=1,
            message_type="train",
        )
        return arrays_to_numpy(client_app.train(msg, ctx).content["arrays"])

    a, b = train(1.0, context(0)), train(50.0, context(0))  # no global prototypes: lambda is irrelevant
    for k in start:
        np.testing.assert_array_equal(a[k], b[k])
    # a client that holds a head uses it, not the head inside the global arrays
    ctx = context(0)
    mine = {k: np.full(tuple(start[k].shape), 0.3, np.float32) for k in task.head_keys()}
    ctx.state["cell"] = ConfigRecord({"id": ""})  # state of this (unnamed) cell, not a previous one's
    ctx.state["fedpac-head"] = numpy_to_arrays(mine)
    poisoned = {**start, **{k: start[k] + 100.0 for k in task.head_keys()}}
    c = train(1.0, ctx, poisoned)
    assert all(np.abs(c[k] - 0.3).max() < 5.0 for k in task.head_keys())


# --------------------------------------------------------------------------- server


class FakeGrid:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


def simplex_qp_by_enumeration(p):
    """argmin a'Pa over the probability simplex: the best KKT point over every support set."""
    m = p.shape[0]
    best, best_val = None, np.inf
    for r in range(1, m + 1):
        for s in itertools.combinations(range(m), r):
            ps = p[np.ix_(s, s)]
            try:
                w = np.linalg.solve(ps, np.ones(r))
            except np.linalg.LinAlgError:
                continue
            if w.sum() <= 0 or np.any(w < -1e-12):
                continue
            a = np.zeros(m)
            a[list(s)] = w / w.sum()
            val = a @ p @ a
            if val < best_val - 1e-15:
                best, best_val = a, val
    return best


def synthetic_replies(msgs, rng, sizes, num_classes=4, d=5):
    """Client models (a body, a head, a BN buffer and counter) and FedPAC's extra entries."""
    replies, models = [], []
    for i, (msg, n) in enumerate(zip(msgs, sizes, strict=True)):
        counts = rng.integers(0, 6, size=num_classes).astype(np.float64)
        counts[i % num_classes] = 0.0  # every client misses one class
        mod = {
            "body.weight": rng.normal(size=(3, 4)).astype(np.float32),
            "bn.running_var": rng.uniform(0.5, 1.5, size=(3,)).astype(np.float32),
            "bn.num_batches_tracked": np.array(10 + i, dtype=np.int64),
            "head.weight": rng.normal(size=(num_classes, d)).astype(np.float32),
            "head.bias": rng.normal(size=(num_classes,)).astype(np.float32),
            FEDPAC_V: np.array([rng.uniform(0.5, 2.0)]),
            FEDPAC_H: 0.4 * rng.normal(size=(num_classes, d)),
            FEDPAC_PROTO: rng.normal(size=(num_classes, d)) * (counts > 0)[:, None],
            FEDPAC_COUNT: counts,
        }
        models.append(mod)
        content = RecordDict(
            {"arrays": numpy_to_arrays(mod), "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}
        )
        replies.append(Message(content, reply_to=msg))
    return replies, models


def test_aggregate_averages_the_body_and_combines_heads_per_client():
    rng = np.random.default_rng(3)
    g = {
        "body.weight": np.zeros((3, 4), np.float32),
        "bn.running_var": np.ones(3, np.float32),
        "bn.num_batches_tracked": np.array(9, np.int64),
        "head.weight": np.zeros((4, 5), np.float32),
        "head.bias": np.zeros(4, np.float32),
    }
    strategy = make_strategy("fedpac", {"num_clients": 3, "head_keys": ["head.weight", "head.bias"]})
    assert isinstance(strategy, FedPAC) and strategy.lam == 1.0
    grid = FakeGrid([21, 22, 23])
    msgs = list(strategy.configure_train(1, numpy_to_arrays(g), ConfigRecord(), grid))
    cfg = msgs[0].content["config"]
    assert cfg["local-algorithm"] == "fedpac" and cfg["fedpac-lambda"] == 1.0 and cfg["fedpac-head-lr"] == 0.1
    assert not any(k.startswith("fedpac::") for k in msgs[0].content["arrays"])  # round 1: nothing yet
    sizes = [10, 30, 60]
    replies, models = synthetic_replies(msgs, rng, sizes)
    arrays, metrics = strategy.aggregate_train(1, replies)
    new = arrays_to_numpy(arrays)
    # the global arrays: the sample-weighted mean of the client models (the body the clients use)
    p = np.array(sizes) / sum(sizes)
    assert set(new) == set(g)
    for k in g:
        expect = sum(pi * m[k].astype(np.float64) for pi, m in zip(p, models, strict=True))
        if g[k].dtype == np.int64:
            expect = np.rint(expect)
        np.testing.assert_allclose(new[k], expect, rtol=1e-6, atol=1e-6)
        assert new[k].dtype == g[k].dtype
    # each client's head: the alpha-weighted mean of the trained heads, alpha from an independent QP solve
    vs = [float(m[FEDPAC_V][0]) for m in models]
    hs = [m[FEDPAC_H] for m in models]
    mixed = 0
    for i, msg in enumerate(msgs):
        pm = np.diag(vs) + np.array(
            [[np.sum((hs[i] - hs[a]) * (hs[i] - hs[b])) for b in range(3)] for a in range(3)]
        )
        alpha = simplex_qp_by_enumeration(pm)
        alpha = np.where(alpha > 1e-3, alpha, 0.0)
        mixed += int(np.count_nonzero(alpha) > 1)
        head = strategy.personal_heads[msg.metadata.dst_node_id]
        for k in ("head.weight", "head.bias"):
            expect = (
                sum(a * m[k].astype(np.float64) for a, m in zip(alpha, models, strict=True)) / alpha.sum()
            )
            np.testing.assert_allclose(head[k], expect, atol=5e-5)
    assert mixed >= 1  # the synthetic statistics make at least one client borrow other heads
    assert 0 < metrics["fedpac-self-weight"] < 1 and metrics["fedpac-qp-fallbacks"] == 0
    # global prototypes: per class, the class-count-weighted mean over the clients that have the class
    counts = np.stack([m[FEDPAC_COUNT] for m in models])
    protos = np.stack([m[FEDPAC_PROTO] for m in models])
    expect = np.einsum("ic,icd->cd", counts, protos) / np.maximum(counts.sum(0), 1)[:, None]
    # evaluation and next-round training messages carry each node's head; training also the prototypes
    ev = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))
    tr = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    for m in (*ev, *tr):
        got = arrays_to_numpy(m.content["arrays"])
        head = strategy.personal_heads[m.metadata.dst_node_id]
        for k in ("head.weight", "head.bias"):
            np.testing.assert_array_equal(got[FEDPAC_HEAD + k], head[k])
    for m in tr:
        got = arrays_to_numpy(m.content["arrays"])
        np.testing.assert_allclose(got[FEDPAC_GLOBAL_PROTO], expect, atol=1e-12)
        np.testing.assert_array_equal(got[FEDPAC_GLOBAL_COUNT], counts.sum(0))
    assert not any(k.startswith("fedpac::global") for k in ev[0].content["arrays"])
    # the strategy state (checkpoint) restores the prototypes in a new strategy
    fresh = FedPAC(head_keys=["head.weight", "head.bias"])
    fresh.load_state_dict(strategy.state_dict())
    msg = next(iter(fresh.configure_train(2, arrays, ConfigRecord(), FakeGrid([98, 99]))))
    np.testing.assert_allclose(
        arrays_to_numpy(msg.content["arrays"])[FEDPAC_GLOBAL_PROTO], expect, atol=1e-12
    )
    with pytest.raises(ValueError, match="unknown"):
        fresh.load_state_dict({"other": np.zeros(1)})


# --------------------------------------------------------------------------- whole runs


class InProcessGrid:
    """A Grid that calls the ClientApp functions directly: node ids -> (partition, Context)."""

    def __init__(self, node_ids):
        self.nodes = {nid: context(pid, nid) for pid, nid in enumerate(node_ids)}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            fn = client_app.train if m.metadata.message_type == MessageType.TRAIN else client_app.evaluate
            out.append(fn(m, self.nodes[m.metadata.dst_node_id]))
        return out


def test_restart_with_new_node_ids_continues_exactly(task, tmp_path):
    """Kill after round 1 and restart server and clients (fresh contexts, new node ids, as a resumed
    simulation gets): the clients restore their personalised heads from disk, the server its prototypes,
    and rounds 2-3 equal those of an uninterrupted run."""
    base = {**SPEC.to_config(), "lr": 0.05}

    def run(grid, rounds, ckpt, state_dir):
        cfg = {**base, "client-state-dir": str(state_dir), "cell": "fedpac"}
        return run_training(
            grid, FedPAC(head_keys=task.head_keys(), evaluate_metrics_aggr_fn=evaluate_metrics_aggregate, **ALL3), task, num_rounds=rounds, train_config=cfg,
            checkpoint=Checkpoint(ckpt),
        )  # fmt: skip

    _, ref = run(InProcessGrid([1, 2, 3]), 3, tmp_path / "ref.npz", tmp_path / "ref_state")
    run(InProcessGrid([1, 2, 3]), 1, tmp_path / "cut.npz", tmp_path / "cut_state")
    _, resumed = run(InProcessGrid([7, 8, 9]), 3, tmp_path / "cut.npz", tmp_path / "cut_state")
    assert [h["round"] for h in resumed] == [0, 1, 2, 3]
    for a, b in zip(ref, resumed, strict=True):
        assert a["test"] == b["test"] and a["val"] == b["val"]
        if a["round"] > 0:
            assert a["clients"]["client-accuracy"] == b["clients"]["client-accuracy"]
    # the personalised heads matter: the clients' accuracies are not those of the averaged model
    last = ref[-1]
    assert last["clients"]["accuracy"] != pytest.approx(last["test"]["accuracy"], abs=1e-6)
    assert last["clients"]["accuracy"] > 0.5


@pytest.mark.integration
@pytest.mark.slow
def test_simulation_run_finishes_with_finite_metrics(tmp_path):
    """``--dataset digits --clients 3 --rounds 2 --methods fedpac`` on Flower's simulation engine (Ray).
    (Resuming is checked without Ray above, with the new node ids a resumed simulation gets.)"""
    pytest.importorskip("flwr.simulation")
    pytest.importorskip("ray")
    from robustlab.fedld.experiment import ExperimentConfig, run_experiment
    from robustlab.runs import RunDir

    cfg = ExperimentConfig(dataset="digits", clients=3, beta=1.0, methods=["fedpac"], rounds=2, seeds=1)
    out = tmp_path / "run"
    summary = run_experiment(cfg, out, echo=lambda _m: None)
    hist = RunDir(out).load("method=fedpac__seed=0")["history"]
    assert [h["round"] for h in hist] == [0, 1, 2]
    for h in hist[1:]:
        assert np.isfinite(h["test"]["accuracy"]) and np.isfinite(h["test"]["loss"])
        assert len(h["clients"]["client-accuracy"]) == 3
        assert np.all(np.isfinite(h["clients"]["client-accuracy"]))
        assert h["train"]["replies"] == 3 and np.isfinite(h["diagnostics"]["fedpac-self-weight"])
    assert summary["methods"]["fedpac"]["label"] == "FedPAC"
    assert summary["methods"]["fedpac"]["final_client_accuracy"]["mean"] > 0.3
    ckpt = np.load(out / "checkpoints" / "method=fedpac__seed=0.npz")
    assert "s::" + FEDPAC_GLOBAL_PROTO in ckpt.files
    # the clients stored their personalised heads for the next round (what a resumed run restores)
    assert sorted(p.name for p in (out / "client_state" / "method=fedpac__seed=0").iterdir()) == [
        f"p{i}_r{r}.npz" for i in range(3) for r in (1, 2)
    ]


def test_folders_written_before_fedpac_existed_still_resume(tmp_path):
    """``fedpac_lambda`` joined the resume keys later: a folder whose config.yaml lacks it resumes when the
    run asks for the default, and refuses a different value."""
    from dataclasses import asdict

    import yaml

    from robustlab.errors import UserError
    from robustlab.fedld.experiment import RESUME_KEYS, ExperimentConfig, _resume_keys
    from robustlab.runs import RunDir

    cfg = ExperimentConfig(dataset="digits", clients=3, methods=["fedavg"])
    config = {k: v for k, v in asdict(cfg).items() if k not in ("num_cpus", "client_cpus")}
    old = {k: v for k, v in config.items() if k != "fedpac_lambda"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    keys = _resume_keys(tmp_path, config)
    assert "fedpac_lambda" in RESUME_KEYS and "fedpac_lambda" not in keys
    RunDir.open(tmp_path, config, resume_keys=keys)  # resumes
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    changed = {**config, "fedpac_lambda": 0.5}
    with pytest.raises(UserError, match="fedpac_lambda"):
        RunDir.open(tmp_path, changed, resume_keys=_resume_keys(tmp_path, changed))
