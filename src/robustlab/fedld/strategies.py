"""Server strategies for FedLD and its baselines on Flower's Message API (``flwr.serverapp.strategy``).

Every class here is a Flower ``Strategy`` that any ``ServerApp`` can use (``strategy.start(grid, ...)``).
They share three additions over Flower's ``FedAvg`` (all in :class:`_RobustMixin`):

* **client configuration**: each strategy names the local algorithm its clients must run
  (``local-algorithm``, ``margin-lambda``, ``proximal-mu``, ...) and injects it into the round's
  ``ConfigRecord``, so one generic ``ClientApp`` (:mod:`robustlab.fedld.client_app`) serves every method;
* **fault tolerance**: a round waits at most ``node_wait`` seconds for all ``expected_nodes`` SuperNodes to be
  connected, then goes on with those present if they are at least ``min_nodes`` (an absolute number, or
  ``min_node_fraction`` of the expected ones), and says so in the log (Flower's own sampling waits for
  ``min_available_nodes`` forever, so one SuperNode lost for good stalls the federation); with fewer the round
  is skipped. Replies that carry an error (a client that raised), never came (a client that timed out) or
  are malformed (:meth:`_RobustMixin.reply_problem`: missing or misshapen model entries, non-finite values,
  no usable ``num-examples``) are dropped with a warning, and the round is aggregated from the others as
  long as at least ``min_replies`` arrived; with fewer, the global model is kept unchanged for that round
  (``skipped_rounds`` records it);
* **state and diagnostics**: ``state_dict()`` / ``load_state_dict()`` hold what must survive a restart
  (SCAFFOLD's server control variate), and ``last_diagnostics`` holds per-round numbers (FedLD's update
  size ratio and cosine against FedAvg on the same client deltas).

Deltas are "local minus global" for every ``state_dict`` entry (BatchNorm buffers included), as in the
official FedLD code. Integer entries (``num_batches_tracked``) are returned in their original dtype.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as _FlowerFedAvg
from flwr.serverapp.strategy import FedProx as _FlowerFedProx

from robustlab.fedld.protocol import (
    FEDPAC,
    FEDPAC_COUNT,
    FEDPAC_GLOBAL_COUNT,
    FEDPAC_GLOBAL_PROTO,
    FEDPAC_H,
    FEDPAC_HEAD,
    FEDPAC_PROTO,
    FEDPAC_V,
    SCAFFOLD_ACCEPTED,
    SCAFFOLD_C,
    SCAFFOLD_DC,
    NDict,
    arrays_to_numpy,
    numpy_to_arrays,
)

log = logging.getLogger("robustlab.fedld")


#: state entries that are buffers, not parameters (BatchNorm statistics)
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------- array helpers


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


def _reply_order(msg: Message) -> tuple[int, int]:
    metrics = _metric_dict(msg)
    if "partition-id" in metrics:
        return 0, int(metrics["partition-id"])
    return 1, int(msg.metadata.src_node_id)


def _metric_dict(msg: Message) -> dict[str, Any]:
    return dict(next(iter(msg.content.metric_records.values())))


def _arrays_of(msg: Message) -> ArrayRecord:
    return next(iter(msg.content.array_records.values()))


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
    rows.sort(key=lambda m: m.get("partition-id", 0))
    n = np.array([float(m[weighting_key]) for m in rows])
    out = MetricRecord()
    for key in ("accuracy", "loss"):
        vals = np.array([float(m[key]) for m in rows if key in m])
        if len(vals) == len(rows) and len(rows):
            out[key] = float((vals * n).sum() / n.sum()) if n.sum() > 0 else float(vals.mean())
            out[f"{key}-unweighted"] = float(vals.mean())
    if rows and all("accuracy" in m for m in rows):
        out["client-accuracy"] = [float(m["accuracy"]) for m in rows]
        out["client-partition"] = [int(m.get("partition-id", -1)) for m in rows]
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


# --------------------------------------------------------------------------- shared machinery


class _RobustMixin:
    """Client configuration, minimum replies, global-array cache, state and diagnostics (see module doc)."""

    #: the local algorithm the ClientApp runs for this strategy (see ``client_app.train``)
    local_algorithm = "sgd"

    #: prefixes of array entries a reply may carry besides the model's (SCAFFOLD's and FedPAC's extras)
    reply_extra_prefixes: tuple[str, ...] = ()

    def _robust_init(
        self,
        min_replies: int,
        client_config: Mapping[str, Any] | None,
        *,
        expected_nodes: int | None = None,
        min_nodes: int = 0,
        min_node_fraction: float = 0.5,
        node_wait: float = 120.0,
    ) -> None:
        if min_replies < 1:
            raise ValueError("min_replies must be >= 1")
        if min_nodes < 0 or not (0.0 < min_node_fraction <= 1.0) or not node_wait >= 0:
            raise ValueError("need min_nodes >= 0, 0 < min_node_fraction <= 1 and node_wait >= 0")
        self.min_replies = int(min_replies)
        self.extra_client_config = dict(client_config or {})
        self.expected_nodes = int(expected_nodes or self.min_available_nodes)  # type: ignore[attr-defined]
        self.min_nodes = int(min_nodes) or max(1, math.ceil(min_node_fraction * self.expected_nodes))
        self.node_wait = float(node_wait)
        self.global_arrays: NDict | None = None
        self.last_diagnostics: dict[str, float] = {}
        self.skipped_rounds: list[int] = []

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
        self, grid: Grid, server_round: int, configure: Callable[[], Any]
    ) -> list[Message]:
        """Run Flower's ``configure_*`` with its node minimums lowered to the nodes present, so that its own
        sampling (which would wait for ``min_available_nodes`` forever) takes them as they are."""
        nodes = self.available_nodes(grid, server_round)
        self.last_diagnostics.setdefault("nodes", float(len(nodes)))  # the training phase's count
        if not nodes:
            return []
        saved = (self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes)  # type: ignore[attr-defined]
        n = len(nodes)
        self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = (min(v, n) for v in saved)
        try:
            return list(configure())
        finally:
            self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = saved

    # -- what the clients must do
    def client_config(self) -> dict[str, Any]:
        """Keys this strategy adds to every training ``ConfigRecord``."""
        return {"local-algorithm": self.local_algorithm, "margin-lambda": 0.0, **self.extra_client_config}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays_to_numpy(arrays)
        self.last_diagnostics = {}
        for k, v in self.client_config().items():
            config[k] = v
        out = self._outgoing_arrays(arrays)
        return self._with_present_nodes(
            grid,
            server_round,
            lambda: super(_RobustMixin, self).configure_train(server_round, out, config, grid),  # type: ignore[misc]
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:  # type: ignore[attr-defined]
            return []
        return self._with_present_nodes(
            grid,
            server_round,
            lambda: super(_RobustMixin, self).configure_evaluate(server_round, arrays, config, grid),  # type: ignore[misc]
        )

    def _outgoing_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        return arrays

    # -- replies
    def _usable_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message] | None:
        """Valid replies, or ``None`` (round skipped, model kept) when fewer than ``min_replies`` arrived."""
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)  # type: ignore[attr-defined]
        well_formed = []
        for msg in valid:
            problem = self.reply_problem(msg)
            if problem is None:
                well_formed.append(msg)
            else:
                log.warning(
                    "round %d: dropping the reply of node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    problem,
                )
        self.last_diagnostics["malformed"] = float(len(valid) - len(well_formed))
        valid = well_formed
        self.last_diagnostics["replies"] = float(len(valid))
        self.last_diagnostics["failures"] = float(len(errors))
        self.accepted_replies = list(valid)
        if len(valid) < self.min_replies:
            log.warning(
                "round %d: %d usable replies < min_replies=%d; keeping the global model",
                server_round,
                len(valid),
                self.min_replies,
            )
            self.skipped_rounds.append(server_round)
            return None
        # Replies arrive in completion order; floating-point sums (and FedGH's pairing) depend on the
        # order, so fix it: by partition id (stable across restarts), else by node id.
        return sorted(valid, key=_reply_order)

    def reply_problem(self, msg: Message) -> str | None:
        """Why a training reply cannot be aggregated, or ``None``: it must hold one ArrayRecord with every
        entry of the global model (same shape, finite), no entries other than those and the strategy's
        extras (``reply_extra_prefixes``, finite too), and one MetricRecord with a finite ``num-examples``
        > 0."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "expected one ArrayRecord and one MetricRecord"
        weight = dict(next(iter(content.metric_records.values()))).get(self.weighted_by_key)  # type: ignore[attr-defined]
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not (math.isfinite(weight) and weight > 0)
        ):
            return f"'{self.weighted_by_key}' is missing or not a positive number"  # type: ignore[attr-defined]
        assert self.global_arrays is not None, "configure_train must run before aggregate_train"
        record = _arrays_of(msg)
        missing = [k for k in self.global_arrays if k not in record]
        if missing:
            return f"{len(missing)} model entries missing (e.g. {missing[0]})"
        extra = [
            k for k in record if k not in self.global_arrays and not k.startswith(self.reply_extra_prefixes)
        ]
        if extra:
            return f"unexpected entries (e.g. {extra[0]})"
        for k, v in record.items():
            try:
                a = v.numpy()
            except Exception as exc:  # an undecodable array
                return f"entry {k} cannot be read ({type(exc).__name__})"
            ref = self.global_arrays.get(k)
            if ref is not None and a.shape != ref.shape:
                return f"entry {k} has shape {a.shape}, the model's is {ref.shape}"
            if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
                return f"entry {k} holds non-finite values"
        return None

    def _client_models(self, valid: list[Message]) -> tuple[list[NDict], list[float]]:
        models = [arrays_to_numpy(_arrays_of(m)) for m in valid]
        weights = [float(_metric_dict(m)[self.weighted_by_key]) for m in valid]  # type: ignore[attr-defined]
        return models, weights

    def _deltas(self, models: list[NDict]) -> list[NDict]:
        assert self.global_arrays is not None, "configure_train must run before aggregate_train"
        g = self.global_arrays
        return [{k: m[k] - g[k] for k in g} for m in models]

    def _train_metrics(self, valid: list[Message]) -> MetricRecord:
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)  # type: ignore[attr-defined]
        if "partition-id" in metrics:  # an identifier, not a quantity to average
            del metrics["partition-id"]
        for k, v in self.last_diagnostics.items():
            metrics[k] = float(v)
        return metrics

    def _finish(self, new_global: Mapping[str, np.ndarray]) -> ArrayRecord:
        assert self.global_arrays is not None
        return numpy_to_arrays(cast_like(new_global, self.global_arrays))

    # -- state for checkpoints
    def state_dict(self) -> NDict:
        """Arrays that must survive a restart (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class FedAvg(_RobustMixin, _FlowerFedAvg):
    """Flower's ``FedAvg`` (sample-weighted mean of client models), with the shared additions above.

    The aggregation is Flower's own ``aggregate_arrayrecords``; only the dtype of integer buffers is
    restored afterwards (Flower returns them as floats).
    """

    def __init__(
        self,
        *,
        min_replies: int = 1,
        client_config: Mapping[str, Any] | None = None,
        expected_nodes: int | None = None,
        min_nodes: int = 0,
        min_node_fraction: float = 0.5,
        node_wait: float = 120.0,
        **flower_kwargs: Any,
    ) -> None:
        _FlowerFedAvg.__init__(self, **flower_kwargs)
        self._robust_init(
            min_replies,
            client_config,
            expected_nodes=expected_nodes,
            min_nodes=min_nodes,
            min_node_fraction=min_node_fraction,
            node_wait=node_wait,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._usable_replies(server_round, replies)
        if valid is None:
            return None, None
        arrays, _ = _FlowerFedAvg.aggregate_train(self, server_round, valid)
        if arrays is None:
            return None, None
        return self._finish(arrays_to_numpy(arrays)), self._train_metrics(valid)


class FedProx(_RobustMixin, _FlowerFedProx):
    """Flower's ``FedProx``: FedAvg aggregation; clients add (mu/2)||w - w_global||^2 (``proximal-mu``)."""

    local_algorithm = "sgd"

    def __init__(
        self,
        *,
        proximal_mu: float = 0.01,
        min_replies: int = 1,
        client_config: Mapping[str, Any] | None = None,
        expected_nodes: int | None = None,
        min_nodes: int = 0,
        min_node_fraction: float = 0.5,
        node_wait: float = 120.0,
        **flower_kwargs: Any,
    ) -> None:
        _FlowerFedProx.__init__(self, proximal_mu=proximal_mu, **flower_kwargs)
        self._robust_init(
            min_replies,
            client_config,
            expected_nodes=expected_nodes,
            min_nodes=min_nodes,
            min_node_fraction=min_node_fraction,
            node_wait=node_wait,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return FedAvg.aggregate_train(self, server_round, replies)  # type: ignore[arg-type]


class _DeltaStrategy(FedAvg):
    """Base for strategies that aggregate client deltas into one global update ``w <- w + server_lr * g``."""

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (server_lr > 0 and math.isfinite(server_lr)):
            raise ValueError(f"server_lr must be a positive number, got {server_lr}")
        self.server_lr = float(server_lr)

    def global_update(self, deltas: list[NDict], weights: list[float]) -> NDict:
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._usable_replies(server_round, replies)
        if valid is None:
            return None, None
        models, weights = self._client_models(valid)
        deltas = self._deltas(models)
        update = self.global_update(deltas, weights)
        g = self.global_arrays
        assert g is not None
        new = {
            k: g[k].astype(np.float64) + self.server_lr * np.asarray(update[k], dtype=np.float64) for k in g
        }
        return self._finish(new), self._train_metrics(valid)


class FedAvgUnweighted(_DeltaStrategy):
    """Control: FedAvg with a plain (unweighted) mean over clients, as FedLD ignores client sizes."""

    def global_update(self, deltas: list[NDict], weights: list[float]) -> NDict:
        from robustlab.fedld.aggregation import mean_delta

        return mean_delta(deltas)


class FedAvgServerLR(_DeltaStrategy):
    """Control: FedAvg with a server learning rate, ``w <- w + server_lr * sum_i p_i delta_i``.

    With ``server_lr`` set to FedLD's measured update-size ratio it separates "FedLD takes smaller steps"
    from "FedLD takes different steps".
    """

    SERVER_LR = "server-lr"

    def global_update(self, deltas: list[NDict], weights: list[float]) -> NDict:
        from robustlab.fedld.aggregation import mean_delta

        return mean_delta(deltas, weights)

    # The server lr is checkpointed: a resumed run keeps the step size it started with, even if the
    # FedLD run it was matched to has since changed (e.g. been extended to more rounds).
    def state_dict(self) -> NDict:
        return {self.SERVER_LR: np.array(self.server_lr)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        unknown = set(state) - {self.SERVER_LR}
        if unknown:
            raise ValueError(f"FedAvgServerLR keeps only {self.SERVER_LR!r}, got {sorted(unknown)}")
        if self.SERVER_LR in state:  # checkpoints written before the lr was saved lack it
            self.server_lr = float(state[self.SERVER_LR])


class FedLD(_DeltaStrategy):
    """FedLD (Zeng et al., MICCAI 2024): margin-control local loss + principal-gradient aggregation.

    Clients train with ``CE + margin_lambda * log(1 + ||softmax(logits)||_F^2)`` (``margin-lambda`` in the
    config). The server caches the global arrays in ``configure_train`` and, in ``aggregate_train``, replaces
    the mean of the client deltas by :func:`robustlab.fedld.aggregation.principal_gradient_aggregate`
    (per tensor: top ``floor(k_proportion * m)`` principal directions of the m client deltas, each client's
    delta rebuilt along them with weights sigma_j^2 / sum sigma^2, then an unweighted mean), and applies
    ``w <- w + g`` (server lr 1, as the official code).

    Each round ``last_diagnostics`` (and the round's train metrics) hold ``update-ratio`` = ||g|| /
    ||FedAvg update|| and ``update-cosine`` = cos(g, FedAvg update) on the same deltas over the model's
    parameters (``diagnostic_keys``; by default every float entry except BatchNorm running statistics,
    whose large deltas would otherwise dominate the norm), the same two against the unweighted mean, the
    per-tensor min/max ratio, and ``update-ratio-all-entries`` / ``update-cosine-all-entries`` over every
    float entry (what the aggregation itself touches).

    Decisions on the official code's quirks (brief section 1.6): no hidden learning-rate warm-up (the
    client lr is the configured lr from round 1); no "plain mean in the first round" special case (the
    official code takes the plain mean while its EMA history is empty, i.e. in its first round, where its
    warm-up's lr of 0 leaves only the BatchNorm statistics moving; without the warm-up, the principal-
    gradient aggregation applies from the first round); full or partial participation both work, as ``m``
    is the number of replies.
    """

    def __init__(
        self,
        *,
        k_proportion: float = 0.8,
        margin_lambda: float = 0.1,
        diagnostic_keys: Collection[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not (0.0 < k_proportion <= 1.0):
            raise ValueError(f"k_proportion must be in (0, 1], got {k_proportion}")
        if margin_lambda < 0:
            raise ValueError(f"margin_lambda must be >= 0, got {margin_lambda}")
        self.k_proportion = float(k_proportion)
        self.margin_lambda = float(margin_lambda)
        self.diagnostic_keys = list(diagnostic_keys) if diagnostic_keys is not None else None

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "margin-lambda": self.margin_lambda}

    def _parameter_keys(self, deltas: list[NDict]) -> list[str]:
        if self.diagnostic_keys is not None:
            return [k for k in self.diagnostic_keys if k in deltas[0]]
        return [
            k
            for k, v in deltas[0].items()
            if np.issubdtype(np.asarray(v).dtype, np.floating) and not k.endswith(BUFFER_SUFFIXES)
        ]

    def global_update(self, deltas: list[NDict], weights: list[float]) -> NDict:
        from robustlab.fedld.aggregation import principal_gradient_aggregate, update_size_ratio

        g = principal_gradient_aggregate(deltas, k_proportion=self.k_proportion)
        diag = update_size_ratio(deltas, g, weights=weights, keys=self._parameter_keys(deltas))
        every = update_size_ratio(deltas, g, weights=weights)
        self.last_diagnostics.update(
            {
                "update-ratio": diag["ratio_weighted"],
                "update-cosine": diag["cosine_weighted"],
                "update-ratio-unweighted": diag["ratio_unweighted"],
                "update-cosine-unweighted": diag["cosine_unweighted"],
                "update-tensor-ratio-min": diag["tensor_ratio_min"],
                "update-tensor-ratio-max": diag["tensor_ratio_max"],
                "update-ratio-all-entries": every["ratio_weighted"],
                "update-cosine-all-entries": every["cosine_weighted"],
            }
        )
        return g


class FedLDMarginOnly(FedAvg):
    """Ablation: FedLD's margin-control local loss with plain FedAvg aggregation."""

    def __init__(self, *, margin_lambda: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if margin_lambda < 0:
            raise ValueError(f"margin_lambda must be >= 0, got {margin_lambda}")
        self.margin_lambda = float(margin_lambda)

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "margin-lambda": self.margin_lambda}


class FedLDAggregationOnly(FedLD):
    """Ablation: FedLD's principal-gradient aggregation with plain cross-entropy clients."""

    def __init__(self, *, k_proportion: float = 0.8, **kwargs: Any) -> None:
        kwargs.pop("margin_lambda", None)
        super().__init__(k_proportion=k_proportion, margin_lambda=0.0, **kwargs)


class FedGH(_DeltaStrategy):
    """FedGH (gradient harmonization, as the FedLD repo's ``pcgrad_hierarchy``): clients are paired by their
    projection on the history direction (EMA of past aggregates, gamma 0.99) and conflicting pairs are
    projected onto each other's normal plane before averaging
    (:func:`robustlab.fedld.aggregation.gradient_harmonize`). The first round is the plain mean, as in the
    official code. The history is strategy state (checkpointed)."""

    HISTORY = "fedgh-history::"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: NDict | None = None

    def global_update(self, deltas: list[NDict], weights: list[float]) -> NDict:
        from robustlab.fedld.aggregation import gradient_harmonize, update_history

        g = gradient_harmonize(deltas, history=self.history)
        self.history = update_history(self.history, g)
        return g

    def state_dict(self) -> NDict:
        return {self.HISTORY + k: v for k, v in (self.history or {}).items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        n = len(self.HISTORY)
        self.history = {k[n:]: np.asarray(v, np.float64) for k, v in state.items()} or None


class FedBN(FedAvg):
    """FedBN (Li et al., ICLR 2021): BatchNorm parameters and statistics stay on the clients.

    ``local_keys`` are the model's BatchNorm entries; clients keep their own values for them in
    ``context.state`` and ignore the server's. The server still averages them (sample-weighted) into its
    copy, which is used only for the server-side evaluation of "the" global model; the FedBN-native number
    is the client-side evaluation with local BatchNorm (``client-accuracy``).
    """

    local_algorithm = "sgd"

    def __init__(self, *, local_keys: Collection[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local_keys = sorted(local_keys)
        if not self.local_keys:
            raise ValueError("FedBN needs the model's BatchNorm keys (local_keys); the model has none")

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "local-keys": list(self.local_keys)}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["local-keys"] = list(self.local_keys)
        return super().configure_evaluate(server_round, arrays, config, grid)


class Scaffold(_DeltaStrategy):
    """SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates.

    The server control variate ``c`` (one entry per trainable parameter, named like the model's parameters)
    travels inside the arrays record under the prefix ``scaffold-c::``; each client keeps its own ``c_i``
    in ``context.state``, corrects every local step by ``c - c_i`` and returns ``delta c_i`` under the
    prefix ``scaffold-dc::``. Server: ``w <- w + server_lr * sum_i p_i delta_i`` and
    ``c <- c + (|S| / N) * mean_i delta c_i`` with N = ``expected_nodes`` (every client), so that
    ``c = mean_i c_i`` over all N clients at all times.

    **Faults.** That invariant needs the server and each client to agree on which ``delta c_i`` were
    applied. The server applies those of every well-formed reply, also in a round it skips for too few
    replies (the model stays, ``c`` moves with the clients' ``c_i``), and tells the clients, in the next
    training config (``scaffold-accepted-rounds``, one entry per partition: the last round whose change of
    that client was applied). A client keeps its new ``c_i`` as pending and commits it only when the server
    says it was applied; a reply that was dropped (malformed, timed out) leaves ``c_i`` and ``c`` both as
    they were.
    """

    local_algorithm = "scaffold"
    reply_extra_prefixes = (SCAFFOLD_DC,)
    ACCEPTED = SCAFFOLD_ACCEPTED

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.control: NDict = {}
        self.accepted_rounds = np.full(self.expected_nodes, -1, dtype=np.int64)

    def _outgoing_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        out = ArrayRecord({k: v for k, v in arrays.items()})
        for k, v in self.control.items():
            out[SCAFFOLD_C + k] = Array(np.asarray(v, order="C"))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["scaffold-has-control"] = bool(self.control)
        config[self.ACCEPTED] = [int(r) for r in self.accepted_rounds]
        return super().configure_train(server_round, arrays, config, grid)

    def _client_models(self, valid: list[Message]) -> tuple[list[NDict], list[float]]:
        models, weights = super()._client_models(valid)
        models = [{k: v for k, v in m.items() if not k.startswith(SCAFFOLD_DC)} for m in models]
        return models, weights

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        new, metrics = super().aggregate_train(server_round, replies)
        self._apply_control_changes(server_round, self.accepted_replies)
        return new, metrics

    def _apply_control_changes(self, server_round: int, accepted: list[Message]) -> None:
        from robustlab.fedld.aggregation import scaffold_server_control

        dcs, pids = [], []
        for msg in accepted:
            dc = {
                k[len(SCAFFOLD_DC) :]: v.numpy()
                for k, v in _arrays_of(msg).items()
                if k.startswith(SCAFFOLD_DC)
            }
            if dc:
                dcs.append(dc)
                pids.append(int(_metric_dict(msg).get("partition-id", -1)))
        if not dcs:
            return
        c = self.control or {k: np.zeros_like(v, dtype=np.float32) for k, v in dcs[0].items()}
        new_c = scaffold_server_control(c, dcs, max(self.expected_nodes, len(dcs)))
        self.control = {k: v.astype(np.float32) for k, v in new_c.items()}
        for pid in pids:
            if 0 <= pid < len(self.accepted_rounds):
                self.accepted_rounds[pid] = server_round

    def global_update(self, deltas: list[NDict], weights: list[float]) -> NDict:
        from robustlab.fedld.aggregation import mean_delta

        return mean_delta(deltas, weights)

    def state_dict(self) -> NDict:
        return {**{SCAFFOLD_C + k: v for k, v in self.control.items()}, self.ACCEPTED: self.accepted_rounds}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.control = {
            k[len(SCAFFOLD_C) :]: np.asarray(v, np.float32)
            for k, v in state.items()
            if k.startswith(SCAFFOLD_C)
        }
        if self.ACCEPTED in state:  # checkpoints written before the acceptance protocol lack it
            self.accepted_rounds = np.asarray(state[self.ACCEPTED], dtype=np.int64).copy()


class MOON(FedAvg):
    """MOON (Li, He & Song, CVPR 2021): FedAvg aggregation; clients add the model-contrastive loss
    ``mu * l_con`` between the current representation, the global model's and their previous local
    model's (kept in ``context.state``), with temperature ``tau``."""

    local_algorithm = "moon"

    def __init__(self, *, mu: float = 1.0, tau: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mu < 0 or tau <= 0:
            raise ValueError(f"MOON needs mu >= 0 and tau > 0, got mu={mu}, tau={tau}")
        self.mu, self.tau = float(mu), float(tau)

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "moon-mu": self.mu, "moon-tau": self.tau}


class FedPAC(FedAvg):
    """FedPAC (Xu, Tong & Huang, ICLR 2023), as the official FedLD repo runs it (``methods/fedpac.py``,
    ``running.py`` ``train_round_fedpac``, ``tools.py``): feature alignment to global class prototypes on the
    clients, and a personalised classifier head per client, combined on the server from the heads of the
    clients whose features look alike.

    **Client** (``local-algorithm = fedpac``, :func:`robustlab.fedld.client_app.fedpac_local_train`): starts
    from the global body and its own head; computes its statistics (v_i, h_i) and class prototypes on the
    starting model; trains the head alone (body frozen) for ``head_epochs`` epoch(s) at ``head_lr`` (the
    official code's hard-coded ``epoch_classifier = 1``, ``lr_g = 0.1``), then the body alone (head frozen)
    for the configured local epochs at the configured lr with ``CE + lam * MSE(z, prototype of y)``
    (:func:`robustlab.fedld.losses.fedpac_alignment_loss`; no alignment before the server has
    prototypes, i.e. in the first round, as the official ``round > 0``); returns its whole model plus
    ``fedpac::v``, ``fedpac::h``, its prototypes after training and its class counts.

    **Server** (:meth:`aggregate_train`): the new global arrays are the sample-weighted mean of the client
    models (the official ``average_weights_weighted``; clients use only its body, every entry outside
    ``head_keys``, BatchNorm statistics included); the global prototypes are the class-count-weighted mean
    of the clients' prototypes (``protos_aggregation``; they replace the previous ones); client i's new
    head is ``sum_j alpha_ij head_j / sum_j alpha_ij`` over this round's trained heads, with alpha_i from
    :func:`robustlab.fedld.aggregation.fedpac_head_weights` on the statistics the clients computed before
    training (as the official code), or its own trained head when that QP has no PSD form (``None``).

    **Where the heads live.** As in the official code (each client object keeps its local model), the
    clients own their heads: ``context.state["fedpac-head"]``, also written to ``client-state-dir``. The
    server only relays the combination: it keeps each client's new head under the node id its reply came
    from (``personal_heads``, valid within one Flower run) and sends it with that node's next messages
    (``fedpac::head::<key>``): this round's evaluation message (the client evaluates with it and stores
    it) and the next training message. So a resumed simulation (fresh node ids) continues exactly: the
    clients restore their stored heads, and the strategy state (:meth:`state_dict`) holds the global
    prototypes. A client that never trained starts from the global (averaged) head, where the official code
    would keep the initial one (they differ only with partial participation).

    **Evaluation.** Client-side evaluation uses each client's own head on the global body (FedPAC's
    number: ``client-accuracy``); the server-side evaluation of "the" global model uses the averaged model
    (global body + sample-weighted mean of the trained heads), which no client uses, as a reference only.

    ``last_diagnostics``: ``fedpac-self-weight`` (mean over clients of the weight of its own head),
    ``fedpac-collaborators`` (mean number of heads with non-zero weight), ``fedpac-qp-fallbacks`` (clients
    that kept their own head) and ``fedpac-variance`` (mean v_i).
    """

    local_algorithm = "fedpac"
    reply_extra_prefixes = (FEDPAC,)

    def __init__(
        self,
        *,
        lam: float = 1.0,
        head_keys: Collection[str] = ("head.weight", "head.bias"),
        head_lr: float = 0.1,
        head_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"FedPAC lam must be a finite number >= 0, got {lam}")
        if not (head_lr > 0 and math.isfinite(head_lr)) or int(head_epochs) < 0:
            raise ValueError(f"FedPAC needs head_lr > 0 and head_epochs >= 0, got {head_lr}, {head_epochs}")
        self.head_keys = list(head_keys)
        if not self.head_keys:
            raise ValueError("FedPAC needs the model's classifier-head keys (head_keys)")
        self.lam, self.head_lr, self.head_epochs = float(lam), float(head_lr), int(head_epochs)
        self.global_protos: np.ndarray | None = None
        self.global_proto_counts: np.ndarray | None = None
        self.personal_heads: dict[int, NDict] = {}

    def client_config(self) -> dict[str, Any]:
        return {
            **super().client_config(),
            "fedpac-lambda": self.lam,
            "fedpac-head-keys": list(self.head_keys),
            "fedpac-head-lr": self.head_lr,
            "fedpac-head-epochs": self.head_epochs,
        }

    def _outgoing_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        missing = [k for k in self.head_keys if k not in arrays]
        if missing:
            raise ValueError(f"FedPAC head keys {missing} are not entries of the model")
        out = ArrayRecord({k: v for k, v in arrays.items()})
        if self.global_protos is not None and self.global_proto_counts is not None:
            out[FEDPAC_GLOBAL_PROTO] = Array(np.asarray(self.global_protos, order="C"))
            out[FEDPAC_GLOBAL_COUNT] = Array(np.asarray(self.global_proto_counts, order="C"))
        return out

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> list[Message]:
        """One message per node; a node with a personalised head gets it added to its arrays record."""
        messages = []
        for node_id in node_ids:
            content = record
            head = self.personal_heads.get(node_id)
            if head is not None:
                arrays = ArrayRecord({k: v for k, v in record[self.arrayrecord_key].items()})  # type: ignore[union-attr]
                for k, v in head.items():
                    arrays[FEDPAC_HEAD + k] = Array(np.asarray(v, order="C"))
                content = RecordDict(
                    {self.arrayrecord_key: arrays, self.configrecord_key: record[self.configrecord_key]}
                )
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from robustlab.fedld.aggregation import (
            aggregate_prototypes,
            combine_heads,
            fedpac_head_weights,
            mean_delta,
        )

        valid = self._usable_replies(server_round, replies)
        if valid is None:
            return None, None
        assert self.global_arrays is not None, "configure_train must run before aggregate_train"
        models, weights = self._client_models(valid)
        nodes = [int(m.metadata.src_node_id) for m in valid]
        # global arrays: the sample-weighted mean of the client models (the clients use its body)
        new = mean_delta([{k: m[k] for k in self.global_arrays} for m in models], weights)
        # personalised heads from the statistics computed before training and the heads after it
        heads = [{k: m[k] for k in self.head_keys} for m in models]
        alphas = fedpac_head_weights(
            [float(np.ravel(m[FEDPAC_V])[0]) for m in models], [m[FEDPAC_H] for m in models]
        )
        self_weight, collaborators = [], []
        for i, (node, alpha) in enumerate(zip(nodes, alphas, strict=True)):
            if alpha is None:
                self.personal_heads[node] = heads[i]
                self_weight.append(1.0)
                collaborators.append(1.0)
            else:
                self.personal_heads[node] = combine_heads(heads, alpha)
                self_weight.append(float(alpha[i] / alpha.sum()))
                collaborators.append(float(np.count_nonzero(alpha)))
        # global prototypes: per class, the count-weighted mean of the clients' prototypes
        protos, sizes = [], []
        for m in models:
            counts = np.ravel(m[FEDPAC_COUNT])
            present = np.flatnonzero(counts > 0)
            protos.append({int(c): m[FEDPAC_PROTO][c] for c in present})
            sizes.append({int(c): float(counts[c]) for c in present})
        merged = aggregate_prototypes(protos, sizes)
        shape = np.shape(models[0][FEDPAC_PROTO])
        self.global_protos = np.zeros(shape, dtype=np.float64)
        self.global_proto_counts = np.zeros(shape[0], dtype=np.float64)
        for c, proto in merged.items():
            self.global_protos[c] = proto
            self.global_proto_counts[c] = sum(s.get(c, 0.0) for s in sizes)
        self.last_diagnostics.update(
            {
                "fedpac-self-weight": float(np.mean(self_weight)),
                "fedpac-collaborators": float(np.mean(collaborators)),
                "fedpac-qp-fallbacks": float(sum(a is None for a in alphas)),
                "fedpac-variance": float(np.mean([np.ravel(m[FEDPAC_V])[0] for m in models])),
            }
        )
        return self._finish(new), self._train_metrics(valid)

    def state_dict(self) -> NDict:
        if self.global_protos is None or self.global_proto_counts is None:
            return {}
        return {FEDPAC_GLOBAL_PROTO: self.global_protos, FEDPAC_GLOBAL_COUNT: self.global_proto_counts}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        unknown = sorted(set(state) - {FEDPAC_GLOBAL_PROTO, FEDPAC_GLOBAL_COUNT})
        if unknown:
            raise ValueError(f"FedPAC state has unknown entries {unknown}")
        if state:
            self.global_protos = np.asarray(state[FEDPAC_GLOBAL_PROTO], np.float64)
            self.global_proto_counts = np.asarray(state[FEDPAC_GLOBAL_COUNT], np.float64)
        else:
            self.global_protos = self.global_proto_counts = None


# --------------------------------------------------------------------------- registry

#: method name -> (strategy factory, one-line description); factories take the experiment's options
STRATEGIES: dict[str, tuple[Callable[..., Any], str]] = {}


def _register(name: str, description: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        STRATEGIES[name] = (fn, description)
        return fn

    return deco


def _common(o: Mapping[str, Any]) -> dict[str, Any]:
    n = int(o.get("num_clients", 2))
    return {
        "min_replies": int(o.get("min_replies", 1)),
        "fraction_train": float(o.get("fraction_train", 1.0)),
        "fraction_evaluate": float(o.get("fraction_evaluate", 1.0)),
        "min_train_nodes": min(n, int(o.get("min_train_nodes", n))),
        "min_evaluate_nodes": min(n, int(o.get("min_evaluate_nodes", n))),
        "min_available_nodes": min(n, int(o.get("min_available_nodes", n))),
        "evaluate_metrics_aggr_fn": evaluate_metrics_aggregate,
        "expected_nodes": n,
        "min_nodes": int(o.get("min_nodes", 0)),
        "min_node_fraction": float(o.get("min_node_fraction", 0.5)),
        "node_wait": float(o.get("node_wait", 120.0)),
    }


@_register("fedavg", "FedAvg, sample-weighted mean (Flower's)")
def _fedavg(o: Mapping[str, Any]) -> FedAvg:
    return FedAvg(**_common(o))


@_register("fedprox", "FedProx, (mu/2)||w - w_g||^2 on the clients (Flower's)")
def _fedprox(o: Mapping[str, Any]) -> FedProx:
    return FedProx(proximal_mu=float(o.get("proximal_mu", 0.01)), **_common(o))


@_register("fedavg-unweighted", "control: FedAvg with an unweighted mean")
def _fedavg_unweighted(o: Mapping[str, Any]) -> FedAvgUnweighted:
    return FedAvgUnweighted(**_common(o))


@_register("fedavg-slr", "control: FedAvg with server lr = FedLD's measured update-size ratio")
def _fedavg_slr(o: Mapping[str, Any]) -> FedAvgServerLR:
    return FedAvgServerLR(server_lr=float(o["server_lr"]), **_common(o))


@_register("fedld", "FedLD: margin control + principal-gradient aggregation")
def _fedld(o: Mapping[str, Any]) -> FedLD:
    return FedLD(
        k_proportion=float(o.get("k_proportion", 0.8)),
        margin_lambda=float(o.get("margin_lambda", 0.1)),
        diagnostic_keys=o.get("param_keys"),
        **_common(o),
    )


@_register("fedld-margin", "ablation: margin control only (FedAvg aggregation)")
def _fedld_margin(o: Mapping[str, Any]) -> FedLDMarginOnly:
    return FedLDMarginOnly(margin_lambda=float(o.get("margin_lambda", 0.1)), **_common(o))


@_register("fedld-pg", "ablation: principal-gradient aggregation only (CE clients)")
def _fedld_pg(o: Mapping[str, Any]) -> FedLDAggregationOnly:
    return FedLDAggregationOnly(
        k_proportion=float(o.get("k_proportion", 0.8)), diagnostic_keys=o.get("param_keys"), **_common(o)
    )


@_register("fedgh", "FedGH: pairwise gradient harmonization (FedLD repo)")
def _fedgh(o: Mapping[str, Any]) -> FedGH:
    return FedGH(**_common(o))


@_register("fedbn", "FedBN: BatchNorm kept local")
def _fedbn(o: Mapping[str, Any]) -> FedBN:
    return FedBN(local_keys=o["bn_keys"], **_common(o))


@_register("scaffold", "SCAFFOLD: control variates (option II)")
def _scaffold(o: Mapping[str, Any]) -> Scaffold:
    return Scaffold(**_common(o))


@_register("moon", "MOON: model-contrastive local loss")
def _moon(o: Mapping[str, Any]) -> MOON:
    return MOON(mu=float(o.get("moon_mu", 1.0)), tau=float(o.get("moon_tau", 0.5)), **_common(o))


@_register("fedpac", "FedPAC: feature alignment to global prototypes + personalised head combination")
def _fedpac(o: Mapping[str, Any]) -> FedPAC:
    return FedPAC(
        lam=float(o.get("fedpac_lambda", 1.0)),
        head_keys=o.get("head_keys") or ("head.weight", "head.bias"),
        **_common(o),
    )


def make_strategy(method: str, options: Mapping[str, Any]) -> Any:
    """Build the strategy for ``method`` (a key of :data:`STRATEGIES`) from the experiment's options."""
    if method not in STRATEGIES:
        raise KeyError(method)
    return STRATEGIES[method][0](options)
