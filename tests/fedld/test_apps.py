"""The ClientApp called directly with Flower messages (no simulation): each local algorithm's update is
checked against an SGD step computed by hand in the test, and per-client state against its definition."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr.app")
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from robustlab.fedld import client_app
from robustlab.fedld.protocol import PENDING_ROUND, SCAFFOLD_C, SCAFFOLD_DC
from robustlab.fedld.task import TaskSpec, load_task

SPEC = TaskSpec(dataset="digits", num_partitions=3, beta=1.0, seed=0, min_partition_size=10)


@pytest.fixture(autouse=True)
def _setup(task_identity):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return load_task(SPEC)


def context(pid: int = 0) -> Context:
    return Context(
        run_id=1,
        node_id=pid + 1,
        node_config={"partition-id": pid, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def message(state: dict, config: dict, kind: str = MessageType.TRAIN, extra: dict | None = None) -> Message:
    arrays = ArrayRecord({k: v.detach().clone() for k, v in state.items()})
    from flwr.app import Array

    for k, v in (extra or {}).items():
        arrays[k] = Array(np.asarray(v))
    cfg = ConfigRecord({**SPEC.to_config(), "server-round": 1, **config})
    return Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=1, message_type=kind)


def full_batch(task, pid):
    idx = torch.as_tensor(task.partitions[pid])
    return task.x_train[idx], task.y_train[idx]


def reply_state(reply: Message) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in reply.content["arrays"].items()}


def manual_steps(model, x, y, lr, steps, loss_extra=None):
    """Plain SGD (no momentum, no weight decay) on the full batch, written out by hand."""
    model.train()
    params = [p for p in model.parameters()]
    g0 = [p.detach().clone() for p in params]
    for _ in range(steps):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        if loss_extra is not None:
            loss = loss + loss_extra(model, logits, params, g0)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g
    return model.state_dict()


PLAIN = {"momentum": 0.0, "weight-decay": 0.0, "batch-size": 10_000, "lr": 0.05}


def assert_states_close(a, b, atol=1e-5):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(
            a[k].float().numpy(), b[k].float().numpy(), atol=atol, rtol=1e-4, err_msg=k
        )


def test_plain_sgd_step_equals_hand_computed_step(task):
    torch.manual_seed(0)
    model = task.build_model()
    start = copy.deepcopy(model.state_dict())
    reply = client_app.train(message(start, PLAIN), context(1))
    x, y = full_batch(task, 1)
    expected = manual_steps(model, x, y, lr=0.05, steps=1)
    assert_states_close(reply_state(reply), expected)
    assert reply.content["metrics"]["num-examples"] == len(task.partitions[1])
    assert reply.content["metrics"]["local-steps"] == 1


def test_margin_control_step_uses_frobenius_norm_of_batch_softmax(task):
    torch.manual_seed(1)
    model = task.build_model()
    start = copy.deepcopy(model.state_dict())
    reply = client_app.train(message(start, {**PLAIN, "margin-lambda": 0.3}), context(0))
    x, y = full_batch(task, 0)

    def margin(_m, logits, _p, _g):
        p = torch.softmax(logits, 1)
        return 0.3 * torch.log(1 + (p * p).sum())  # one scalar per batch (official MarginalLogLoss)

    expected = manual_steps(model, x, y, lr=0.05, steps=1, loss_extra=margin)
    assert_states_close(reply_state(reply), expected)
    # and it differs from the plain step
    plain = client_app.train(message(start, PLAIN), context(0))
    diff = max(
        float((reply_state(reply)[k].float() - reply_state(plain)[k].float()).abs().max()) for k in start
    )
    assert diff > 1e-6


def test_fedprox_two_steps_include_the_proximal_gradient(task):
    torch.manual_seed(2)
    model = task.build_model()
    start = copy.deepcopy(model.state_dict())
    reply = client_app.train(message(start, {**PLAIN, "proximal-mu": 5.0, "local-epochs": 2}), context(2))
    x, y = full_batch(task, 2)

    def prox(_m, _logits, params, g0):
        return 2.5 * sum(((p - g) ** 2).sum() for p, g in zip(params, g0, strict=True))

    expected = manual_steps(model, x, y, lr=0.05, steps=2, loss_extra=prox)
    assert_states_close(reply_state(reply), expected)


def test_scaffold_control_variates_follow_option_two(task):
    torch.manual_seed(3)
    model = task.build_model()
    start = copy.deepcopy(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    rng = np.random.default_rng(0)
    c = {n: (0.01 * rng.normal(size=tuple(p.shape))).astype(np.float32) for n, p in model.named_parameters()}
    ctx = context(0)
    cfg = {**PLAIN, "local-algorithm": "scaffold", "local-epochs": 2}
    reply = client_app.train(message(start, cfg, extra={SCAFFOLD_C + n: v for n, v in c.items()}), ctx)
    out = reply_state(reply)
    # the step: gradient + (c - c_i) with c_i = 0 before the first round
    x, y = full_batch(task, 0)

    def corr(_m, _logits, params, _g):
        return sum((p * torch.from_numpy(c[n])).sum() for n, p in zip(names, params, strict=True))

    expected = manual_steps(model, x, y, lr=0.05, steps=2, loss_extra=corr)
    assert_states_close({k: v for k, v in out.items() if not k.startswith(SCAFFOLD_DC)}, expected)
    # c_i+ = c_i - c + (w - theta) / (K lr), K = 2 steps; the client returns c_i+ - c_i and keeps c_i+ as
    # pending until the server says it applied the change
    assert "scaffold-ci" not in ctx.state
    stored = ctx.state["scaffold-ci-pending"]
    for n in names:
        c_plus = 0 - c[n] + (start[n].numpy() - out[n].numpy()) / (2 * 0.05)
        np.testing.assert_allclose(stored[n].numpy(), c_plus, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[SCAFFOLD_DC + n].numpy(), c_plus, rtol=1e-4, atol=1e-5)
    stored = {k: v for k, v in stored.items()}
    made_in = int(stored[PENDING_ROUND].numpy()[0])
    # the server applied it (its accepted round for partition 0 is that round): committed
    client_app.settle_scaffold(ctx, {"scaffold-accepted-rounds": [made_in, -1]}, 0)
    assert "scaffold-ci-pending" not in ctx.state
    np.testing.assert_array_equal(ctx.state["scaffold-ci"][names[0]].numpy(), stored[names[0]].numpy())
    # a change the server dropped is dropped by the client too: c_i stays as it was
    ctx2 = context(0)
    client_app.train(message(start, cfg, extra={SCAFFOLD_C + n: v for n, v in c.items()}), ctx2)
    client_app.settle_scaffold(ctx2, {"scaffold-accepted-rounds": [made_in - 1, -1]}, 0)
    assert "scaffold-ci" not in ctx2.state and "scaffold-ci-pending" not in ctx2.state


def test_moon_keeps_previous_model_and_fedbn_keeps_local_batchnorm(task, tmp_path):
    torch.manual_seed(4)
    model = task.build_model()
    start = copy.deepcopy(model.state_dict())
    ctx = context(1)
    reply = client_app.train(message(start, {"local-algorithm": "moon", "moon-mu": 1.0}), ctx)
    prev = ctx.state["moon-prev"]
    for k, v in reply_state(reply).items():
        np.testing.assert_array_equal(prev[k].numpy(), v.numpy())

    bn = task.batchnorm_keys()
    assert bn and all("conv." in k for k in bn)
    ctx = context(2)
    cfg = {"local-keys": bn, "client-state-dir": str(tmp_path)}
    r1 = reply_state(client_app.train(message(start, cfg), ctx))
    # round 2: the server sends different BatchNorm values; the client must start from its own
    poisoned = {k: (v + 100.0 if k in bn and v.is_floating_point() else v) for k, v in start.items()}
    r2_cfg = {**cfg, "server-round": 2, "lr": 1e-12}  # (almost) no training: BN stats move only by momentum
    out = reply_state(client_app.train(message(poisoned, r2_cfg), ctx))
    for k in bn:
        if out[k].is_floating_point():
            assert float((out[k] - r1[k]).abs().max()) < 5.0, k  # nowhere near the +100 the server sent
    # the state was written to disk; a fresh context (a restarted node) restores it for the next round
    fresh = context(2)
    client_app._load_state(fresh, {**cfg, "server-round": 3}, 2, 3)
    for k in bn:
        np.testing.assert_array_equal(
            fresh.state["fedbn-local"][k].numpy(), ctx.state["fedbn-local"][k].numpy()
        )


def test_evaluate_reports_accuracy_on_the_clients_test_share(task):
    torch.manual_seed(5)
    model = task.build_model()
    reply = client_app.evaluate(message(model.state_dict(), {}, kind=MessageType.EVALUATE), context(1))
    m = reply.content["metrics"]
    idx = task.test_partitions[1]
    model.eval()
    with torch.no_grad():
        acc = float((model(task.x_test[idx]).argmax(1) == task.y_test[idx]).float().mean())
    assert m["accuracy"] == pytest.approx(acc)
    assert m["num-examples"] == len(idx) and m["partition-id"] == 1
    with torch.no_grad():
        pred = model(task.x_test[idx]).argmax(1)
        vidx = task.val_partitions[1]
        val_hits = int((model(task.x_val[vidx]).argmax(1) == task.y_val[vidx]).sum())
    y = task.y_test[idx]
    assert list(m["test-class-count"]) == [int((y == c).sum()) for c in range(task.num_classes)]
    assert list(m["test-class-correct"]) == [
        int(((y == c) & (pred == c)).sum()) for c in range(task.num_classes)
    ]
    assert m["val-examples"] == len(vidx) > 0 and m["val-correct"] == val_hits


@pytest.mark.parametrize("split", ["test", "val"])
def test_test_shares_follow_training_label_mix_and_cover_the_test_split(task, split):
    parts = task.test_partitions if split == "test" else task.val_partitions
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # disjoint
    y_tr = task.y_train.numpy()
    y_te = (task.y_test if split == "test" else task.y_val).numpy()
    trained = {int(c) for p in task.partitions for c in np.unique(y_tr[p])}
    assert set(np.flatnonzero(np.isin(y_te, list(trained)))) == set(allidx)
    for c in range(task.num_classes):
        n_tr = np.array([np.sum(y_tr[p] == c) for p in task.partitions], dtype=float)
        n_te = np.array([np.sum(y_te[p] == c) for p in parts], dtype=float)
        if n_tr.sum():
            assert np.all(np.abs(n_te - n_tr / n_tr.sum() * n_te.sum()) < 1.0 + 1e-9)


def test_injected_fault_raises():
    cfg = {"fault-partition": 0, "fault-kind": "raise", "fault-rounds": [2]}
    client_app._maybe_fault(cfg, 0, 1)  # other round: nothing
    client_app._maybe_fault(cfg, 1, 2)  # other client: nothing
    with pytest.raises(client_app.InjectedFault):
        client_app._maybe_fault(cfg, 0, 2)


def test_restarted_client_resumes_from_its_newest_state_after_a_missed_round(tmp_path):
    """A client that failed round 2 still holds its round-1 state when round 3 starts; a restarted client
    must load exactly that (not nothing), and after round 3 its round-3 state."""
    from flwr.app import Array

    key = client_app.STATE_KEYS[0]
    cfg = {"client-state-dir": str(tmp_path), "cell": "c"}
    live = context(0)
    live.state[key] = ArrayRecord({"x": Array(np.array([1.0]))})
    client_app._save_state(live, cfg, 0, 1)
    live.state[key] = ArrayRecord({"x": Array(np.array([3.0]))})  # round 2 missed; round 3 trains
    client_app._save_state(live, cfg, 0, 3)
    for resume_round, expected in ((3, 1.0), (4, 3.0)):  # killed before / after the server's round 3
        fresh = context(0)
        client_app._load_state(fresh, cfg, 0, resume_round)
        assert float(fresh.state[key]["x"].numpy()[0]) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0_r1.npz", "p0_r3.npz"]
    live.state[key] = ArrayRecord({"x": Array(np.array([4.0]))})
    client_app._save_state(live, cfg, 0, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0_r3.npz", "p0_r4.npz"]  # older ones go


def test_a_supernode_keeps_its_state_in_its_state_dir_across_a_restart(task, tmp_path):
    """Deployment: no client-state-dir from the server, the SuperNode's own ``state-dir`` node config. A
    node restarted before round 2 (or a run resubmitted after a killed ServerApp: a new Flower run, so an
    empty context.state) trains round 2 exactly as the node that kept running; without the state-dir it
    does not (MOON's previous model is gone)."""
    torch.manual_seed(5)
    start = copy.deepcopy(task.build_model().state_dict())
    cfg = {"local-algorithm": "moon", "moon-mu": 1.0, "cell": "moon-0-0123abcd"}

    def node(state_dir=None):
        ctx = context(1)
        if state_dir is not None:
            ctx.node_config["state-dir"] = str(state_dir)
        return ctx

    live = node(tmp_path)
    client_app.train(message(start, cfg), live)
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npz")] == [
        "moon-0-0123abcd/p1_r1.npz"
    ]
    r2 = {**cfg, "server-round": 2}
    want = reply_state(client_app.train(message(start, r2), live))
    restarted = reply_state(client_app.train(message(start, r2), node(tmp_path)))
    forgot = reply_state(client_app.train(message(start, r2), node()))
    assert all(torch.equal(restarted[k], want[k]) for k in want)  # bit for bit
    assert any(not torch.equal(forgot[k], want[k]) for k in want)
    # the server's simulation folder wins over the node's; a cell name cannot leave the node's folder
    assert client_app._state_config({"client-state-dir": "/sim"}, {"state-dir": str(tmp_path)}) == {
        "client-state-dir": "/sim"
    }
    odd = client_app._state_config({"cell": "../../etc/x"}, {"state-dir": str(tmp_path)})
    assert Path(odd["client-state-dir"]).parent == tmp_path
