"""The one server strategy every method of this package is: a delta-based FedAvg with a pluggable aggregator.

Round ``t`` of :class:`DeltaStrategy`, one method per protocol step (the style of Flower's ``FedAvg``):

1. :meth:`~DeltaStrategy.configure_train`: wait a bounded time for the SuperNodes
   (:meth:`~DeltaStrategy.available_nodes`), send every node the global arrays ``w_t`` (plus the method's
   extras, :meth:`~DeltaStrategy.outgoing_arrays`) and a ``ConfigRecord`` naming the local algorithm and its
   hyper-parameters (:meth:`~DeltaStrategy.client_config`), so one generic ClientApp serves every method;
2. :meth:`~DeltaStrategy.aggregate_train`: drop the replies that failed or that :class:`ReplyFilter` rejects,
   put the rest in partition order (:class:`ClientUpdates`), and set

   .. math::  w_{t+1} = w_t + \\eta \\, A\\big(\\{\\Delta_i, n_i\\}_{i \\in S_t}\\big), \\qquad
              \\Delta_i = w_i - w_t

   with the method's :class:`Aggregator` ``A`` (mean, principal gradients, FedGH, ...; see
   :mod:`robustlab.fedld.strategies.aggregators`), server learning rate ``eta`` and ``n_i`` the clients'
   ``num-examples``. Deltas cover every ``state_dict`` entry (BatchNorm buffers included), as in the official
   FedLD code; integer entries (``num_batches_tracked``) come back in their dtype, rounded;
3. :meth:`~DeltaStrategy.configure_evaluate` / ``aggregate_evaluate``: the clients evaluate ``w_{t+1}`` on
   their shares (:func:`evaluate_metrics_aggregate`).

**Faults.** A round waits at most ``node_wait`` seconds for all ``expected_nodes`` SuperNodes, then goes on
with those present if they are at least ``min_nodes`` (an absolute number, else ``min_node_fraction`` of the
expected ones) and says so in the log; with fewer it is skipped (Flower's own sampling waits for
``min_available_nodes`` forever, so one SuperNode lost for good would stall the federation). With fewer than
``min_replies`` usable replies the global model is kept for the round (``skipped_rounds``). These keyword
arguments are the base class's; the methods' classes pass them through.

**State and diagnostics.** ``state_dict()`` / ``load_state_dict()`` hold what must survive a restart (the
aggregator's and the method's state); ``last_diagnostics`` the round's numbers (nodes, replies, failures,
malformed replies, and the aggregator's, e.g. FedLD's update-size ratio against FedAvg), also added to the
round's training metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from robustlab.fedld.protocol import NUM_EXAMPLES, PARTITION_ID, NDict, arrays_to_numpy, numpy_to_arrays

log = logging.getLogger("robustlab.fedld")

#: state entries that are buffers, not parameters (BatchNorm statistics)
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def cast_like(arrays: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> NDict:
    """Cast each entry to the dtype of ``like`` (integer buffers are rounded, not truncated)."""
    out = {}
    for k, v in arrays.items():
        ref = like.get(k)
        if ref is None:
            out[k] = v
        elif np.issubdtype(ref.dtype, np.integer):
            out[k] = np.rint(v).astype(ref.dtype)
        else:
            out[k] = np.asarray(v, dtype=ref.dtype)
    return out


def metric_dict(msg: Message) -> dict[str, Any]:
    """The (only) MetricRecord of a reply, as a dict."""
    return dict(next(iter(msg.content.metric_records.values())))


def arrays_of(msg: Message) -> ArrayRecord:
    """The (only) ArrayRecord of a reply."""
    return next(iter(msg.content.array_records.values()))


def reply_order(msg: Message) -> tuple[int, int]:
    """Sort key of a reply: its partition id (stable across restarts), else its node id."""
    metrics = metric_dict(msg)
    if PARTITION_ID in metrics:
        return 0, int(metrics[PARTITION_ID])
    return 1, int(msg.metadata.src_node_id)


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class ReplyFilter:
    """Which training replies can be aggregated.

    A reply must hold one ArrayRecord with every entry of the global model (same shape, finite), no entries
    other than those and the method's extras (names starting with one of ``extra_prefixes``, finite too),
    and one MetricRecord with a finite ``weight_key`` > 0.
    """

    extra_prefixes: tuple[str, ...] = ()
    weight_key: str = NUM_EXAMPLES

    def problem(self, msg: Message, global_arrays: Mapping[str, np.ndarray]) -> str | None:
        """Why ``msg`` cannot be aggregated, or ``None``."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "expected one ArrayRecord and one MetricRecord"
        weight = metric_dict(msg).get(self.weight_key)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not (math.isfinite(weight) and weight > 0)
        ):
            return f"'{self.weight_key}' is missing or not a positive number"
        record = arrays_of(msg)
        missing = [k for k in global_arrays if k not in record]
        if missing:
            return f"{len(missing)} model entries missing (e.g. {missing[0]})"
        extra = [k for k in record if k not in global_arrays and not k.startswith(self.extra_prefixes)]
        if extra:
            return f"unexpected entries (e.g. {extra[0]})"
        for k, v in record.items():
            try:
                a = v.numpy()
            except Exception as exc:  # an undecodable array
                return f"entry {k} cannot be read ({type(exc).__name__})"
            ref = global_arrays.get(k)
            if ref is not None and a.shape != ref.shape:
                return f"entry {k} has shape {a.shape}, the model's is {ref.shape}"
            if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
                return f"entry {k} holds non-finite values"
        return None


@dataclass
class ClientUpdates:
    """One round's accepted replies in partition order: what an :class:`Aggregator` sees."""

    global_arrays: NDict  #: w_t
    replies: list[Message]
    weight_key: str = NUM_EXAMPLES
    models: list[NDict] = field(init=False)  #: each client's arrays record (model entries and extras)
    weights: list[float] = field(init=False)  #: each client's ``num-examples``

    def __post_init__(self) -> None:
        self.models = [arrays_to_numpy(arrays_of(m)) for m in self.replies]
        self.weights = [float(metric_dict(m)[self.weight_key]) for m in self.replies]

    @cached_property
    def deltas(self) -> list[NDict]:
        """Delta_i = w_i - w_t for every entry of the global model (in the model's dtype)."""
        g = self.global_arrays
        return [{k: m[k] - g[k] for k in g} for m in self.models]

    @property
    def contents(self) -> list[RecordDict]:
        return [m.content for m in self.replies]

    @property
    def node_ids(self) -> list[int]:
        return [int(m.metadata.src_node_id) for m in self.replies]


# --------------------------------------------------------------------------- aggregators


class Aggregator:
    """``A``: the clients' deltas (and sample counts) -> the global update ``g``; the strategy sets
    ``w <- w + server_lr * g`` (:meth:`new_global`). Subclasses implement :meth:`update`; a stateful one
    (FedGH's history) also :meth:`state_dict` / :meth:`load_state_dict`; ``diagnostics`` holds the last
    round's numbers."""

    #: one line naming the rule (logged in the strategy summary)
    description = "aggregator"

    def __init__(self) -> None:
        self.diagnostics: dict[str, float] = {}

    def update(self, deltas: Sequence[NDict], weights: Sequence[float]) -> NDict:
        raise NotImplementedError

    def new_global(self, clients: ClientUpdates, server_lr: float) -> NDict:
        """``w + server_lr * A(deltas, weights)`` in float64 (the strategy casts it back)."""
        self.diagnostics = {}
        update = self.update(clients.deltas, clients.weights)
        g = clients.global_arrays
        return {k: g[k].astype(np.float64) + server_lr * np.asarray(update[k], dtype=np.float64) for k in g}

    def state_dict(self) -> NDict:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


# --------------------------------------------------------------------------- the strategy


class DeltaStrategy(FlowerFedAvg):
    """``w <- w + server_lr * aggregator(deltas)`` on Flower's ``FedAvg``, with bounded node waits, a reply
    filter, state and diagnostics (see the module docstring for the round).

    Args:
        aggregator: the rule ``A`` (default: FedAvg's sample-weighted mean, Flower's arithmetic).
        server_lr: ``eta`` > 0 (1 for every method but the server-step control).
        min_replies: fewest usable replies that update the model (else the round keeps it).
        expected_nodes: SuperNodes a round waits for (default ``min_available_nodes``).
        min_nodes: fewest SuperNodes a round goes on with after ``node_wait`` (0: ``min_node_fraction``).
        min_node_fraction: that minimum as a fraction of ``expected_nodes``, rounded up.
        node_wait: seconds a round waits for missing SuperNodes.
        client_config: extra keys for every training ``ConfigRecord``.
        **flower_kwargs: Flower ``FedAvg``'s (``fraction_train``, ``min_*_nodes``, metric aggregators, ...).
    """

    #: the local algorithm the ClientApp runs for this method (see ``client_app.train``)
    local_algorithm = "sgd"
    #: name prefixes of array entries a reply may carry besides the model's (SCAFFOLD's, FedPAC's extras)
    reply_extra_prefixes: tuple[str, ...] = ()

    def __init__(
        self,
        aggregator: Aggregator | None = None,
        *,
        server_lr: float = 1.0,
        min_replies: int = 1,
        expected_nodes: int | None = None,
        min_nodes: int = 0,
        min_node_fraction: float = 0.5,
        node_wait: float = 120.0,
        client_config: Mapping[str, Any] | None = None,
        **flower_kwargs: Any,
    ) -> None:
        super().__init__(**flower_kwargs)
        if not (server_lr > 0 and math.isfinite(server_lr)):
            raise ValueError(f"server_lr must be a positive number, got {server_lr}")
        if min_replies < 1:
            raise ValueError("min_replies must be >= 1")
        if min_nodes < 0 or not (0.0 < min_node_fraction <= 1.0) or not node_wait >= 0:
            raise ValueError("need min_nodes >= 0, 0 < min_node_fraction <= 1 and node_wait >= 0")
        from robustlab.fedld.strategies.aggregators import FlowerMean

        self.aggregator = aggregator if aggregator is not None else FlowerMean()
        self.server_lr = float(server_lr)
        self.min_replies = int(min_replies)
        self.expected_nodes = int(expected_nodes or self.min_available_nodes)
        self.min_nodes = int(min_nodes) or max(1, math.ceil(min_node_fraction * self.expected_nodes))
        self.node_wait = float(node_wait)
        self.extra_client_config = dict(client_config or {})
        self.reply_filter = ReplyFilter(self.reply_extra_prefixes, self.weighted_by_key)
        self.global_arrays: NDict | None = None
        self.last_diagnostics: dict[str, float] = {}
        self.skipped_rounds: list[int] = []

    def summary(self) -> None:
        log.info(
            "\t├──> %s: %s, server lr %g", type(self).__name__, self.aggregator.description, self.server_lr
        )
        log.info(
            "\t├──> Faults: min replies %d, wait %.0f s for %d nodes, then go on with >= %d",
            self.min_replies, self.node_wait, self.expected_nodes, self.min_nodes,
        )  # fmt: skip
        super().summary()

    # -- which SuperNodes take part
    def available_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """The connected nodes, after waiting at most ``node_wait`` s for all ``expected_nodes``; ``[]`` when
        fewer than ``min_nodes`` are there by then (the round is skipped)."""
        deadline = time.monotonic() + self.node_wait
        while True:
            nodes = list(grid.get_node_ids())
            if len(nodes) >= self.expected_nodes:
                return nodes
            if time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if len(nodes) >= self.min_nodes:
            log.warning(
                "round %d: %d of %d SuperNodes connected after %.0f s; going on with them (min_nodes=%d)",
                server_round, len(nodes), self.expected_nodes, self.node_wait, self.min_nodes,
            )  # fmt: skip
            return nodes
        log.warning(
            "round %d: only %d of %d SuperNodes connected after %.0f s (< min_nodes=%d); skipping the round",
            server_round, len(nodes), self.expected_nodes, self.node_wait, self.min_nodes,
        )  # fmt: skip
        return []

    def _with_present_nodes(
        self, grid: Grid, server_round: int, configure: Callable[[], Iterable[Message]]
    ) -> list[Message]:
        """Run Flower's ``configure_*`` with its node minimums lowered to the nodes present, so that its own
        sampling (which would wait for ``min_available_nodes`` forever) takes them as they are."""
        nodes = self.available_nodes(grid, server_round)
        self.last_diagnostics.setdefault("nodes", float(len(nodes)))  # the training phase's count
        if not nodes:
            return []
        saved = (self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes)
        n = len(nodes)
        self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = (min(v, n) for v in saved)
        try:
            return list(configure())
        finally:
            self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = saved

    # -- what the clients must do
    def client_config(self) -> dict[str, Any]:
        """Keys this method adds to every training ``ConfigRecord``."""
        return {"local-algorithm": self.local_algorithm, "margin-lambda": 0.0, **self.extra_client_config}

    def outgoing_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The arrays record sent for training: the global model, plus the method's extras."""
        return arrays

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Cache ``w_t``, add the method's client configuration, and sample the nodes present."""
        self.global_arrays = arrays_to_numpy(arrays)
        self.last_diagnostics = {}
        for k, v in self.client_config().items():
            config[k] = v
        out = self.outgoing_arrays(arrays)
        return self._with_present_nodes(
            grid,
            server_round,
            lambda: super(DeltaStrategy, self).configure_train(server_round, out, config, grid),
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        return self._with_present_nodes(
            grid,
            server_round,
            lambda: super(DeltaStrategy, self).configure_evaluate(server_round, arrays, config, grid),
        )

    # -- replies
    def well_formed_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that carry no error and pass :attr:`reply_filter`, in partition order (the others are
        logged and dropped)."""
        assert self.global_arrays is not None, "configure_train must run before aggregate_train"
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        kept = []
        for msg in valid:
            problem = self.reply_filter.problem(msg, self.global_arrays)
            if problem is None:
                kept.append(msg)
            else:
                log.warning(
                    "round %d: dropping the reply of node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    problem,
                )
        self.last_diagnostics["malformed"] = float(len(valid) - len(kept))
        self.last_diagnostics["replies"] = float(len(kept))
        self.last_diagnostics["failures"] = float(len(errors))
        # Replies arrive in completion order; floating-point sums (and FedGH's pairing) depend on the order,
        # so fix it: by partition id (stable across restarts), else by node id.
        return sorted(kept, key=reply_order)

    def accept_replies(self, server_round: int, replies: list[Message]) -> None:
        """Hook: runs on every round's well-formed replies, also when the round is skipped (SCAFFOLD applies
        the clients' control-variate changes there)."""

    def after_update(self, server_round: int, clients: ClientUpdates) -> None:
        """Hook: runs after the global update of a round that was not skipped (FedPAC's heads)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``w_{t+1} = w_t + server_lr * A(deltas)`` over the well-formed replies; ``(None, None)`` (the model
        is kept) when fewer than ``min_replies`` are left."""
        kept = self.well_formed_replies(server_round, replies)
        self.accept_replies(server_round, kept)
        if len(kept) < self.min_replies:
            log.warning(
                "round %d: %d usable replies < min_replies=%d; keeping the global model",
                server_round, len(kept), self.min_replies,
            )  # fmt: skip
            self.skipped_rounds.append(server_round)
            return None, None
        assert self.global_arrays is not None
        clients = ClientUpdates(self.global_arrays, kept, self.weighted_by_key)
        new = self.aggregator.new_global(clients, self.server_lr)
        self.last_diagnostics.update(self.aggregator.diagnostics)
        self.after_update(server_round, clients)
        return numpy_to_arrays(cast_like(new, self.global_arrays)), self._train_metrics(kept)

    def _train_metrics(self, replies: list[Message]) -> MetricRecord:
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        if PARTITION_ID in metrics:  # an identifier, not a quantity to average
            del metrics[PARTITION_ID]
        for k, v in self.last_diagnostics.items():
            metrics[k] = float(v)
        return metrics

    # -- state for checkpoints
    def state_dict(self) -> NDict:
        """Arrays that must survive a restart (the aggregator's state; methods add theirs)."""
        return self.aggregator.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.aggregator.load_state_dict(state)


def evaluate_metrics_aggregate(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Aggregate client-side evaluation: sample-weighted and unweighted means, and per-client values.

    Each client reports ``accuracy``, ``loss``, ``num-examples`` and ``partition-id``. The result holds
    ``accuracy`` / ``loss`` (weighted by ``num-examples``), ``accuracy-unweighted`` / ``loss-unweighted``
    (plain mean over clients) and ``client-accuracy`` / ``client-partition`` (lists in partition order).
    When every client also reports counts (this project's ClientApp does), the clients' shares are pooled:
    ``balanced-accuracy`` from ``test-class-correct`` / ``test-class-count`` (mean over classes of the
    pooled recall) and ``val-accuracy`` from ``val-correct`` / ``val-examples``.
    """
    rows = [dict(next(iter(r.metric_records.values()))) for r in records]
    rows.sort(key=lambda m: m.get(PARTITION_ID, 0))
    n = np.array([float(m[weighting_key]) for m in rows])
    out = MetricRecord()
    for key in ("accuracy", "loss"):
        vals = np.array([float(m[key]) for m in rows if key in m])
        if len(vals) == len(rows) and len(rows):
            out[key] = float((vals * n).sum() / n.sum()) if n.sum() > 0 else float(vals.mean())
            out[f"{key}-unweighted"] = float(vals.mean())
    if rows and all("accuracy" in m for m in rows):
        out["client-accuracy"] = [float(m["accuracy"]) for m in rows]
        out["client-partition"] = [int(m.get(PARTITION_ID, -1)) for m in rows]
        out["client-examples"] = [int(m[weighting_key]) for m in rows]
    if rows and all("test-class-correct" in m and "test-class-count" in m for m in rows):
        correct = np.sum([np.asarray(m["test-class-correct"], dtype=float) for m in rows], axis=0)
        count = np.sum([np.asarray(m["test-class-count"], dtype=float) for m in rows], axis=0)
        seen = count > 0
        if seen.any():
            out["balanced-accuracy"] = float(np.mean(correct[seen] / count[seen]))
    if rows and all("val-correct" in m and "val-examples" in m for m in rows):
        total = sum(int(m["val-examples"]) for m in rows)
        if total > 0:
            out["val-accuracy"] = sum(int(m["val-correct"]) for m in rows) / total
    return out
