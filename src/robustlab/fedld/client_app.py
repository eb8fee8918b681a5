"""The FedLD ``ClientApp`` (Flower Message API): local training for every method, local evaluation.

One generic ClientApp serves every strategy in :mod:`robustlab.fedld.strategies`: the strategy writes the
local algorithm into the round's ``ConfigRecord`` and the client follows it.

Training config keys (all optional except the data keys; defaults are the paper's):

=====================  ======================================================================
``lr``                 SGD learning rate (0.01); a new optimiser every round, as the official code
``momentum``           0.5
``weight-decay``       5e-4
``batch-size``         50
``local-epochs``       1
``margin-lambda``      λ of FedLD's margin control; 0 means plain cross-entropy
``proximal-mu``        FedProx μ; 0 means no proximal term
``local-algorithm``    ``sgd`` | ``scaffold`` | ``moon`` | ``fedpac``
``local-keys``         FedBN: state entries kept on the client (its BatchNorm)
``moon-mu/moon-tau``   MOON weight and temperature
``fedpac-*``           FedPAC: ``-lambda`` (1.0), ``-head-keys``, ``-head-lr`` (0.1), ``-head-epochs`` (1)
``dataset`` ...        the task (see :class:`robustlab.fedld.task.TaskSpec.from_config`)
=====================  ======================================================================

Per-client state lives in ``context.state`` (SCAFFOLD's ``c_i``, MOON's previous local model, FedBN's
local BatchNorm, FedPAC's personalised head). When the config names a ``client-state-dir`` (the simulation
experiments do) the state is also written there after every round, keyed by partition and round, so a
killed and resumed simulation continues with the same client state. In a real deployment a SuperNode keeps
its own: ``--node-config "... state-dir=DIR"`` (a folder on that site), one subfolder per cell (the
server's ``cell``: method, seed and a fingerprint of the run's settings), so a node restarted, or a run
resubmitted after a killed ServerApp (a new Flower run: empty ``context.state``), continues from it.

The partition comes from the node config: ``partition-id`` and ``num-partitions`` (set automatically by the
simulation engine; passed with ``--node-config`` to ``flower-supernode`` in a real deployment; a real
deployment may also pass ``data-dir``).

Fault injection (for testing deployments): ``fault-partition`` (int), ``fault-kind`` (``raise``, ``sleep``
or ``malformed``), ``fault-seconds`` and ``fault-rounds`` (list of rounds; empty = every round) make that
client raise, stall, or train and then reply with a NaN in its model, to check that a round survives a
failed, slow or broken client.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from robustlab.fedld.config import ExperimentConfig
from robustlab.fedld.protocol import (
    FEDPAC,
    FEDPAC_COUNT,
    FEDPAC_GLOBAL_COUNT,
    FEDPAC_GLOBAL_PROTO,
    FEDPAC_H,
    FEDPAC_HEAD,
    FEDPAC_PROTO,
    FEDPAC_V,
    PENDING_ROUND,
    SCAFFOLD_ACCEPTED,
    SCAFFOLD_C,
    SCAFFOLD_DC,
)
from robustlab.fedld.task import Task, TaskSpec, load_task
from robustlab.runs import atomic_write_bytes

app = ClientApp()

_D = ExperimentConfig()
#: what a key missing from the round's ConfigRecord falls back to (the strategies always send the local
#: algorithm's keys): the shared settings from :class:`~robustlab.fedld.config.ExperimentConfig`; the
#: regularisers off unless a strategy turns them on; FedPAC's head phase as the official code runs it
DEFAULTS: dict[str, Any] = {
    "lr": _D.lr,
    "momentum": _D.momentum,
    "weight-decay": _D.weight_decay,
    "batch-size": _D.batch_size,
    "local-epochs": _D.local_epochs,
    "margin-lambda": 0.0,
    "proximal-mu": 0.0,
    "local-algorithm": "sgd",
    "moon-mu": _D.moon_mu,
    "moon-tau": _D.moon_tau,
    "fedpac-lambda": _D.fedpac_lambda,
    "fedpac-head-lr": 0.1,
    "fedpac-head-epochs": 1,
}

STATE_KEYS = ("scaffold-ci", "scaffold-ci-pending", "moon-prev", "fedbn-local", "fedpac-head")


class InjectedFault(RuntimeError):
    """Raised on purpose by ``fault-kind = raise``."""


def _cfg(config: Mapping[str, Any], key: str) -> Any:
    return config[key] if key in config else DEFAULTS[key]


def client_seed(seed: int, server_round: int, partition_id: int, purpose: str = "train") -> int:
    """A 63-bit seed for one client in one round, from the run seed (resume gives the same numbers)."""
    blob = f"{seed}/{server_round}/{partition_id}/{purpose}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def _maybe_fault(config: Mapping[str, Any], partition_id: int, server_round: int) -> str | None:
    """Apply an injected ``raise`` or ``sleep`` fault; return the fault kind when this client is the faulty
    one this round (``malformed`` is applied to the reply by :func:`train`)."""
    if int(config.get("fault-partition", -1)) != partition_id:
        return None
    rounds = list(config.get("fault-rounds", []) or [])
    if rounds and server_round not in rounds:
        return None
    kind = str(config.get("fault-kind", "raise"))
    if kind == "raise":
        raise InjectedFault(f"injected fault on partition {partition_id} in round {server_round}")
    if kind == "sleep":
        time.sleep(float(config.get("fault-seconds", 30.0)))
    return kind


# --------------------------------------------------------------------------- client state


def _state_config(config: dict[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with its client-state folder: the server's ``client-state-dir`` (the simulation's), else
    the SuperNode's own ``state-dir`` node config, in a subfolder named after the cell (characters outside
    ``[A-Za-z0-9_-]`` replaced: the name comes from the server and must stay inside that folder)."""
    if config.get("client-state-dir") or not node_config.get("state-dir"):
        return config
    cell = re.sub(r"[^A-Za-z0-9_-]", "_", str(config.get("cell", ""))) or "run"
    return {**config, "client-state-dir": str(Path(str(node_config["state-dir"])).expanduser() / cell)}


def _state_path(config: Mapping[str, Any], partition_id: int, server_round: int) -> Path | None:
    d = config.get("client-state-dir")
    return Path(str(d)) / f"p{partition_id}_r{server_round}.npz" if d else None


def _saved_states(config: Mapping[str, Any], partition_id: int) -> list[tuple[int, Path]]:
    """(round, path) of this client's saved state files, oldest first."""
    d = config.get("client-state-dir")
    if not d:
        return []
    found = []
    for path in Path(str(d)).glob(f"p{partition_id}_r*.npz"):
        r = path.stem.rpartition("_r")[2]
        if r.isdigit():
            found.append((int(r), path))
    return sorted(found)


def _enter_cell(context: Context, config: Mapping[str, Any]) -> None:
    """One simulation may train several (method, seed) cells in turn: drop the previous cell's state."""
    cell = str(config.get("cell", ""))
    marker = context.state.get("cell")
    if marker is None or marker.get("id") != cell:  # type: ignore[union-attr]
        for k in STATE_KEYS:
            if k in context.state:
                del context.state[k]
        context.state["cell"] = ConfigRecord({"id": cell})


def _load_state(context: Context, config: Mapping[str, Any], partition_id: int, server_round: int) -> None:
    """Restore this client's state from disk after a restart (only when context.state has none)."""
    _enter_cell(context, config)
    if any(k in context.state for k in STATE_KEYS) or server_round <= 1:
        return
    # the newest saved round before this one: a client that failed a round kept its older state
    saved = [p for r, p in _saved_states(config, partition_id) if r < server_round]
    if not saved:
        return
    with np.load(saved[-1]) as z:
        groups: dict[str, dict[str, np.ndarray]] = {}
        for name in z.files:
            group, key = name.split("::", 1)
            groups.setdefault(group, {})[key] = z[name]
    for group, arrays in groups.items():
        context.state[group] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def _save_state(context: Context, config: Mapping[str, Any], partition_id: int, server_round: int) -> None:
    path = _state_path(config, partition_id, server_round)
    if path is None:
        return
    flat = {}
    for group in STATE_KEYS:
        if group in context.state:
            for k, v in context.state[group].items():  # type: ignore[union-attr]
                flat[f"{group}::{k}"] = v.numpy()
    if not flat:
        return
    buf = io.BytesIO()
    np.savez(buf, **flat)
    atomic_write_bytes(path, buf.getvalue())
    # Keep this round's file and the newest earlier one: a run killed before the server checkpoints this
    # round resumes at this round and loads that one.
    earlier = [p for r, p in _saved_states(config, partition_id) if r < server_round]
    for stale in earlier[:-1]:
        stale.unlink(missing_ok=True)


def _record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


# --------------------------------------------------------------------------- training


def _split_incoming(
    arrays: ArrayRecord,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model state, SCAFFOLD's server control, FedPAC's entries with their ``fedpac::`` names)."""
    model_sd, control, fedpac = {}, {}, {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.array(v.numpy(), copy=True))
        if k.startswith(SCAFFOLD_C):
            control[k[len(SCAFFOLD_C) :]] = t
        elif k.startswith(FEDPAC):
            fedpac[k] = t
        else:
            model_sd[k] = t
    return model_sd, control, fedpac


def _personal_head(fedpac: Mapping[str, torch.Tensor], context: Context) -> dict[str, torch.Tensor] | None:
    """FedPAC: the head the server sent for this client, else the one it stored, else ``None``."""
    sent = {k[len(FEDPAC_HEAD) :]: v for k, v in fedpac.items() if k.startswith(FEDPAC_HEAD)}
    if sent:
        context.state["fedpac-head"] = ArrayRecord({k: Array(v.numpy().copy()) for k, v in sent.items()})
        return sent
    if "fedpac-head" in context.state:
        return _record_to_tensors(context.state["fedpac-head"])  # type: ignore[arg-type]
    return None


def _load_personal_head(model: torch.nn.Module, head: Mapping[str, torch.Tensor] | None) -> None:
    if head:
        model.load_state_dict({**model.state_dict(), **head}, strict=True)


def _load_global(
    model: torch.nn.Module, state: dict[str, torch.Tensor], context: Context, local_keys: list[str]
) -> None:
    if local_keys and "fedbn-local" in context.state:
        local = _record_to_tensors(context.state["fedbn-local"])  # type: ignore[arg-type]
        state = {**state, **{k: v for k, v in local.items() if k in state}}
    model.load_state_dict(state, strict=True)


def local_train(
    task: Task,
    model: torch.nn.Module,
    indices: np.ndarray,
    config: Mapping[str, Any],
    seed: int,
    context: Context | None = None,
    control: Mapping[str, torch.Tensor] | None = None,
    fedpac: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Run the configured local algorithm on ``task.x_train[indices]``; returns the training record.

    The model is modified in place. Returns ``{"loss": mean training loss, "steps": K, "scaffold-dc":
    {...} (SCAFFOLD only), "fedpac": {...} (FedPAC only)}``. ``context`` carries the per-client state
    (SCAFFOLD ``c_i``, MOON's previous model); without one, state starts fresh. ``fedpac`` holds the
    server's global prototypes (``fedpac::global-proto`` / ``-count``), if any.
    """
    from robustlab.fedld.losses import (
        fedprox_term,
        margin_control_loss,
        moon_contrastive_loss,
        scaffold_correction_term,
    )

    lr = float(_cfg(config, "lr"))
    algorithm = str(_cfg(config, "local-algorithm"))
    lam = float(_cfg(config, "margin-lambda"))
    mu = float(_cfg(config, "proximal-mu"))
    batch = int(_cfg(config, "batch-size"))
    epochs = int(_cfg(config, "local-epochs"))
    if algorithm not in ("sgd", "scaffold", "moon", "fedpac"):
        raise ValueError(f"unknown local-algorithm {algorithm!r}")
    if algorithm == "fedpac":
        fedpac = fedpac or {}
        return fedpac_local_train(
            task,
            model,
            indices,
            config,
            seed,
            global_protos=fedpac.get(FEDPAC_GLOBAL_PROTO),
            global_counts=fedpac.get(FEDPAC_GLOBAL_COUNT),
        )

    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    global_params = [p.detach().clone() for p in params]
    global_model = None
    prev_model = None
    if algorithm == "moon":
        import copy

        global_model = copy.deepcopy(model).eval()
        prev_model = copy.deepcopy(model).eval()
        if context is not None and "moon-prev" in context.state:
            prev_model.load_state_dict(_record_to_tensors(context.state["moon-prev"]))  # type: ignore[arg-type]
        for p in (*global_model.parameters(), *prev_model.parameters()):
            p.requires_grad_(False)
    c_global = c_local = None
    if algorithm == "scaffold":
        c_global = [
            control[n] if control and n in control else torch.zeros_like(p)
            for n, p in zip(names, params, strict=True)
        ]
        if context is not None and "scaffold-ci" in context.state:
            ci = _record_to_tensors(context.state["scaffold-ci"])  # type: ignore[arg-type]
            c_local = [ci[n] for n in names]
        else:
            c_local = [torch.zeros_like(p) for p in params]

    opt = torch.optim.SGD(
        params,
        lr=lr,
        momentum=float(_cfg(config, "momentum")),
        weight_decay=float(_cfg(config, "weight-decay")),
    )
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = task.x_train, task.y_train
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    model.train()
    steps, total_loss = 0, 0.0
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=gen)]
        for start in range(0, len(order), batch):
            b = order[start : start + batch]
            x, y = x_all[b], y_all[b]
            if algorithm == "moon":
                z, logits = task.features_and_logits(model, x)
            else:
                logits = model(x)
            loss = (
                margin_control_loss(logits, y, lam)
                if lam > 0
                else torch.nn.functional.cross_entropy(logits, y)
            )
            if mu > 0:
                loss = loss + fedprox_term(params, global_params, mu)
            if algorithm == "scaffold":
                loss = loss + scaffold_correction_term(params, c_global, c_local)
            if algorithm == "moon":
                assert global_model is not None and prev_model is not None
                with torch.no_grad():
                    z_glob, _ = task.features_and_logits(global_model, x)
                    z_prev, _ = task.features_and_logits(prev_model, x)
                loss = loss + float(_cfg(config, "moon-mu")) * moon_contrastive_loss(
                    z, z_glob, z_prev, float(_cfg(config, "moon-tau"))
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            total_loss += float(loss.detach())
    out: dict[str, Any] = {"loss": total_loss / max(steps, 1), "steps": steps}
    if algorithm == "scaffold" and steps > 0:
        from robustlab.fedld.aggregation import scaffold_control_update

        delta = {n: (p.detach() - g).numpy() for n, p, g in zip(names, params, global_params, strict=True)}
        c_new = scaffold_control_update(
            {n: c.numpy() for n, c in zip(names, c_local, strict=True)},  # type: ignore[arg-type]
            {n: c.numpy() for n, c in zip(names, c_global, strict=True)},  # type: ignore[arg-type]
            delta,
            steps,
            lr,
        )
        out["scaffold-dc"] = {
            n: (c_new[n] - c.numpy()).astype(np.float32)
            for n, c in zip(names, c_local, strict=True)  # type: ignore[arg-type]
        }
        if context is not None:  # committed when the server says it applied this change (settle_scaffold)
            pending = {n: Array(c_new[n].astype(np.float32)) for n in names}
            pending[PENDING_ROUND] = Array(np.array([int(config.get("server-round", 0))], dtype=np.int64))
            context.state["scaffold-ci-pending"] = ArrayRecord(pending)
    if algorithm == "moon" and context is not None:
        context.state["moon-prev"] = ArrayRecord(
            {k: Array(v.detach().numpy().copy()) for k, v in model.state_dict().items()}
        )
    return out


@torch.no_grad()
def _features(task: Task, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's representation of ``x`` in eval mode (BatchNorm statistics untouched), in chunks."""
    model.eval()
    if not len(x):
        return torch.zeros(0)
    return torch.cat([task.features_and_logits(model, x[i : i + 512])[0] for i in range(0, len(x), 512)])


def fedpac_local_train(
    task: Task,
    model: torch.nn.Module,
    indices: np.ndarray,
    config: Mapping[str, Any],
    seed: int,
    global_protos: torch.Tensor | None = None,
    global_counts: torch.Tensor | None = None,
) -> dict[str, Any]:
    """FedPAC's local update as the official FedLD repo runs it (``methods/fedpac.py``, ``local_training``
    and ``statistics_extraction``); the model (global body + this client's head) is modified in place.

    1. On the starting model: the features of the client's training samples give its statistics (v, h)
       (:func:`robustlab.fedld.aggregation.fedpac_statistics`, sent to the server for the head
       combination) and its class prototypes (the alignment target for classes the server has no
       prototype of).
    2. Head phase: ``fedpac-head-epochs`` (1) epoch(s) of SGD on the head parameters only (body frozen),
       lr ``fedpac-head-lr`` (0.1), plain cross-entropy: the official ``epoch_classifier = 1``, ``lr_g = 0.1``.
    3. Body phase: ``local-epochs`` epoch(s) of SGD on every other parameter (head frozen) at ``lr``, with
       loss ``CE + fedpac-lambda * MSE(z, c_y)`` (:func:`robustlab.fedld.losses.fedpac_alignment_loss`)
       when the server sent global prototypes (from round 2 on: the official ``if round > 0``).
    4. On the trained model: the class prototypes and class counts the server aggregates.

    Both optimisers are SGD with the configured momentum (0.5) and weight decay (5e-4), new for each phase,
    as in the official code. Why this order (head first, then body): it is what the official code does
    (other FedPAC ports in public code use the same order), and it fits the client's head to the new global
    body before the body is pulled towards the global prototypes under that fixed head. Where the official code looks accidental, this one differs: the feature passes of steps 1
    and 4 run in eval mode under ``no_grad`` (the official step 4 runs in train mode, so it also moves the
    BatchNorm statistics of the returned model; its round-0 step 1 does too). The training phases run in
    train mode, so BatchNorm statistics also move in the head phase, as in the official code.
    """
    from robustlab.fedld.aggregation import class_prototypes, fedpac_statistics
    from robustlab.fedld.losses import fedpac_alignment_loss

    head_keys = [str(k) for k in config.get("fedpac-head-keys", [])] or task.head_keys()
    named = dict(model.named_parameters())
    missing = [k for k in head_keys if k not in model.state_dict()]
    if missing:
        raise ValueError(f"fedpac-head-keys {missing} are not entries of the model")
    head_params = [p for n, p in named.items() if n in head_keys]
    body_params = [p for n, p in named.items() if n not in head_keys]
    lam = float(_cfg(config, "fedpac-lambda"))
    batch = int(_cfg(config, "batch-size"))
    c = task.num_classes
    x_all, y_all = task.x_train, task.y_train
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    y_local = y_all[idx]

    # 1. statistics and prototypes of the starting model
    z0 = _features(task, model, x_all[idx]).double()
    v, h = fedpac_statistics(z0.numpy(), y_local.numpy(), c)
    local_protos = torch.zeros(c, z0.shape[1], dtype=torch.float64)
    for k in torch.unique(y_local).tolist():
        local_protos[k] = z0[y_local == k].mean(0)
    align = global_protos is not None and global_counts is not None and lam > 0
    present = global_counts > 0 if align else None  # type: ignore[operator]

    gen = torch.Generator().manual_seed(seed)
    steps, total_loss = 0, 0.0

    def run_phase(trainable: list[torch.nn.Parameter], lr: float, epochs: int, aligned: bool) -> None:
        nonlocal steps, total_loss
        for p in named.values():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        opt = torch.optim.SGD(
            trainable,
            lr=lr,
            momentum=float(_cfg(config, "momentum")),
            weight_decay=float(_cfg(config, "weight-decay")),
        )
        model.train()
        for _ in range(epochs):
            order = idx[torch.randperm(len(idx), generator=gen)]
            for start in range(0, len(order), batch):
                b = order[start : start + batch]
                x, y = x_all[b], y_all[b]
                z, logits = task.features_and_logits(model, x)
                loss = torch.nn.functional.cross_entropy(logits, y)
                if aligned:
                    loss = loss + lam * fedpac_alignment_loss(z, y, global_protos, present, local_protos)  # type: ignore[arg-type]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                total_loss += float(loss.detach())

    try:
        if head_params:
            run_phase(
                head_params,
                float(_cfg(config, "fedpac-head-lr")),
                int(_cfg(config, "fedpac-head-epochs")),
                False,
            )
        run_phase(body_params, float(_cfg(config, "lr")), int(_cfg(config, "local-epochs")), align)
    finally:
        for p in named.values():
            p.requires_grad_(True)

    # 4. prototypes and class counts of the trained model
    z1 = _features(task, model, x_all[idx]).double().numpy()
    protos, sizes = class_prototypes(z1, y_local.numpy())
    proto_arr = np.zeros((c, z1.shape[1]), dtype=np.float64)
    counts = np.zeros(c, dtype=np.float64)
    for k, p in protos.items():
        proto_arr[k] = p
        counts[k] = sizes[k]
    return {
        "loss": total_loss / max(steps, 1),
        "steps": steps,
        "fedpac": {
            FEDPAC_V: np.array([v], dtype=np.float64),
            FEDPAC_H: np.asarray(h, dtype=np.float64),
            FEDPAC_PROTO: proto_arr,
            FEDPAC_COUNT: counts,
        },
        "fedpac-head": {k: model.state_dict()[k].detach().numpy().copy() for k in head_keys},
    }


def settle_scaffold(context: Context, config: Mapping[str, Any], partition_id: int) -> None:
    """SCAFFOLD: commit the pending ``c_i`` if the server applied its change (the server's
    ``scaffold-accepted-rounds`` names that round for this partition), else drop it; either way ``c_i``
    stays in step with the server's ``c`` (see :class:`robustlab.fedld.strategies.Scaffold`)."""
    if "scaffold-ci-pending" not in context.state:
        return
    pending = dict(context.state["scaffold-ci-pending"].items())  # type: ignore[union-attr]
    made_in = int(pending.pop(PENDING_ROUND).numpy()[0])
    accepted = list(config.get(SCAFFOLD_ACCEPTED, []) or [])
    if partition_id < len(accepted) and int(accepted[partition_id]) == made_in:
        context.state["scaffold-ci"] = ArrayRecord(pending)
    del context.state["scaffold-ci-pending"]


def _task_for(msg: Message, context: Context) -> tuple[Task, dict[str, Any], int]:
    config = dict(msg.content["config"]) if "config" in msg.content else {}
    config = _state_config(config, context.node_config)
    spec = TaskSpec.from_config(config, context.node_config)
    return load_task(spec), config, int(context.node_config["partition-id"])


def train(msg: Message, context: Context) -> Message:
    """Local training from the received global model; replies with the local model and metrics."""
    torch.set_num_threads(int(dict(msg.content["config"]).get("torch-threads", 1)))
    task, config, pid = _task_for(msg, context)
    server_round = int(config.get("server-round", 1))
    fault = _maybe_fault(config, pid, server_round)
    _load_state(context, config, pid, server_round)
    if str(_cfg(config, "local-algorithm")) == "scaffold":
        settle_scaffold(context, config, pid)
    model_sd, control, fedpac = _split_incoming(msg.content["arrays"])  # type: ignore[arg-type]
    local_keys = [str(k) for k in config.get("local-keys", [])]
    torch.manual_seed(client_seed(task.spec.seed, server_round, pid, "init"))
    model = task.build_model()
    _load_global(model, model_sd, context, local_keys)
    if str(_cfg(config, "local-algorithm")) == "fedpac":
        _load_personal_head(model, _personal_head(fedpac, context))
    record = local_train(
        task,
        model,
        task.partitions[pid],
        config,
        client_seed(task.spec.seed, server_round, pid),
        context=context,
        control=control,
        fedpac=fedpac,
    )
    state = model.state_dict()
    if local_keys:
        context.state["fedbn-local"] = ArrayRecord(
            {k: Array(state[k].detach().numpy().copy()) for k in local_keys}
        )
    if "fedpac-head" in record:
        # kept until the server sends the combined head (the official fallback: the client's own head)
        context.state["fedpac-head"] = ArrayRecord({k: Array(v) for k, v in record["fedpac-head"].items()})
    arrays = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in state.items()})
    for k, v in record.get("scaffold-dc", {}).items():
        arrays[SCAFFOLD_DC + k] = Array(v)
    for k, v in record.get("fedpac", {}).items():
        arrays[k] = Array(np.asarray(v, order="C"))
    if fault == "malformed":  # a NaN in the first float entry: the server must drop this reply
        key = next(k for k, v in state.items() if v.is_floating_point())
        bad = state[key].detach().numpy().copy()
        bad.flat[0] = np.nan
        arrays[key] = Array(bad)
    _save_state(context, config, pid, server_round)
    metrics = MetricRecord(
        {
            "num-examples": len(task.partitions[pid]),
            "train-loss": float(record["loss"]),
            "local-steps": int(record["steps"]),
            "partition-id": pid,  # lets the server aggregate in a fixed order
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the client's test and validation parts (FedBN: with this client's BatchNorm;
    FedPAC: with this client's personalised head, which the server sends here right after combining it;
    the client stores it for its next round)."""
    torch.set_num_threads(int(dict(msg.content["config"]).get("torch-threads", 1)))
    task, config, pid = _task_for(msg, context)
    server_round = int(config.get("server-round", 1))
    _load_state(context, config, pid, server_round + 1)
    model_sd, _, fedpac = _split_incoming(msg.content["arrays"])  # type: ignore[arg-type]
    model = task.build_model()
    _load_global(model, model_sd, context, [str(k) for k in config.get("local-keys", [])])
    if any(k.startswith(FEDPAC_HEAD) for k in fedpac):
        _load_personal_head(model, _personal_head(fedpac, context))
        _save_state(context, config, pid, server_round)
    elif "fedpac-head" in context.state:
        _load_personal_head(model, _personal_head(fedpac, context))
    idx = task.test_partitions[pid]
    result = task.evaluate(model, task.x_test[idx], task.y_test[idx], per_class=True)
    vidx = task.val_partitions[pid]
    val = task.evaluate(model, task.x_val[vidx], task.y_val[vidx], per_class=True)
    metrics = MetricRecord(
        {
            "num-examples": len(idx),
            "accuracy": float(result["accuracy"]),
            "loss": float(result["loss"]),
            "partition-id": pid,
            # counts (not rates), so the server pools the clients' shares exactly
            "test-class-correct": result["class_correct"],
            "test-class-count": result["class_count"],
            "val-correct": int(sum(val["class_correct"])),
            "val-examples": len(vidx),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


app.train()(train)
app.evaluate()(evaluate)
