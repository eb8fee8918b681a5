"""The aggregators ``A`` that :class:`~robustlab.fedld.strategies.base.DeltaStrategy` plugs in: thin
adapters from the round's accepted replies to the pure functions of :mod:`robustlab.fedld.aggregation`.

==========================  ====================================================================  =========
aggregator                  global update ``g`` from deltas Delta_i and sample counts n_i          methods
==========================  ====================================================================  =========
:class:`FlowerMean`         sum_i p_i w_i - w, p_i = n_i / sum n (Flower's float32 model average)  FedAvg, FedProx, FedBN, MOON, margin only
:class:`DeltaMean`          sum_i p_i Delta_i (or the unweighted mean), float64                     FedAvg unweighted, FedAvg + server lr, SCAFFOLD
:class:`PrincipalGradients` FedLD's principal-gradient aggregation (+ its size/angle vs FedAvg)    FedLD, PG only
:class:`GradientHarmony`    FedGH as the FedLD repository runs it (EMA history, pairwise PCGrad)  FedGH
==========================  ====================================================================  =========
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from robustlab.fedld.protocol import NDict, arrays_to_numpy
from robustlab.fedld.strategies.base import BUFFER_SUFFIXES, Aggregator, ClientUpdates


class FlowerMean(Aggregator):
    """FedAvg's sample-weighted mean, ``w + sum_i p_i Delta_i = sum_i p_i w_i``, computed as Flower's
    ``FedAvg`` does (``aggregate_arrayrecords`` over the client models, float32 accumulation), so that this
    package's FedAvg is Flower's bit for bit. It replaces the model, so the server lr must be 1."""

    description = "sample-weighted mean of the client models (Flower's FedAvg arithmetic)"

    def new_global(self, clients: ClientUpdates, server_lr: float) -> NDict:
        if server_lr != 1.0:
            raise ValueError("FlowerMean averages models: use DeltaMean for a server learning rate != 1")
        self.diagnostics = {}
        return arrays_to_numpy(aggregate_arrayrecords(clients.contents, clients.weight_key))


class DeltaMean(Aggregator):
    """``g = sum_i p_i Delta_i`` with ``p_i = n_i / sum n`` (``weighted``) or ``1/m``, in float64
    (:func:`robustlab.fedld.aggregation.mean_delta`)."""

    def __init__(self, weighted: bool = True) -> None:
        super().__init__()
        self.weighted = bool(weighted)
        self.description = f"{'sample-weighted' if weighted else 'unweighted'} mean of the deltas"

    def update(self, deltas: Sequence[NDict], weights: Sequence[float]) -> NDict:
        from robustlab.fedld.aggregation import mean_delta

        return mean_delta(deltas, weights if self.weighted else None)


class PrincipalGradients(Aggregator):
    """FedLD's principal-gradient aggregation (:func:`robustlab.fedld.aggregation.principal_gradient_aggregate`,
    Zeng et al. 2024, brief section 1.3): per tensor, the top ``floor(k_proportion * m)`` principal directions
    of the m deltas, each client's delta rebuilt along them with weights sigma_j^2 / sum sigma^2, averaged
    without sample weights.

    ``diagnostics`` each round: ``update-ratio`` = ||g|| / ||FedAvg update|| and ``update-cosine`` =
    cos(g, FedAvg update) on the same deltas over the model's parameters (``diagnostic_keys``; by default
    every float entry except BatchNorm running statistics, whose large deltas would dominate the norm), the
    same two against the unweighted mean, the per-tensor min/max ratio, and ``update-ratio-all-entries`` /
    ``update-cosine-all-entries`` over every float entry (what the aggregation itself touches).
    """

    def __init__(self, k_proportion: float = 0.8, diagnostic_keys: Collection[str] | None = None) -> None:
        super().__init__()
        if not (0.0 < k_proportion <= 1.0):
            raise ValueError(f"k_proportion must be in (0, 1], got {k_proportion}")
        self.k_proportion = float(k_proportion)
        self.diagnostic_keys = list(diagnostic_keys) if diagnostic_keys is not None else None
        self.description = f"principal gradients (k = floor({self.k_proportion:g} m))"

    def _parameter_keys(self, deltas: Sequence[NDict]) -> list[str]:
        if self.diagnostic_keys is not None:
            return [k for k in self.diagnostic_keys if k in deltas[0]]
        return [
            k
            for k, v in deltas[0].items()
            if np.issubdtype(np.asarray(v).dtype, np.floating) and not k.endswith(BUFFER_SUFFIXES)
        ]

    def update(self, deltas: Sequence[NDict], weights: Sequence[float]) -> NDict:
        from robustlab.fedld.aggregation import principal_gradient_aggregate, update_size_ratio

        g = principal_gradient_aggregate(deltas, k_proportion=self.k_proportion)
        diag = update_size_ratio(deltas, g, weights=weights, keys=self._parameter_keys(deltas))
        every = update_size_ratio(deltas, g, weights=weights)
        self.diagnostics = {
            "update-ratio": diag["ratio_weighted"],
            "update-cosine": diag["cosine_weighted"],
            "update-ratio-unweighted": diag["ratio_unweighted"],
            "update-cosine-unweighted": diag["cosine_unweighted"],
            "update-tensor-ratio-min": diag["tensor_ratio_min"],
            "update-tensor-ratio-max": diag["tensor_ratio_max"],
            "update-ratio-all-entries": every["ratio_weighted"],
            "update-cosine-all-entries": every["cosine_weighted"],
        }
        return g


class GradientHarmony(Aggregator):
    """FedGH as the FedLD repository runs it (``svd_tools.pcgrad_hierarchy``;
    :func:`robustlab.fedld.aggregation.gradient_harmonize`): clients are paired by their projection on the
    history direction (EMA of past aggregates, gamma 0.99) and conflicting pairs are projected onto each
    other's normal plane before averaging; the first round (no history) is the plain mean. This is that
    repository's variant, not the FedGH paper's own code. The history is state (checkpointed)."""

    description = "FedGH, the FedLD repository's hierarchical pairwise harmonisation"
    HISTORY = "fedgh-history::"

    def __init__(self) -> None:
        super().__init__()
        self.history: NDict | None = None

    def update(self, deltas: Sequence[NDict], weights: Sequence[float]) -> NDict:
        from robustlab.fedld.aggregation import gradient_harmonize, update_history

        g = gradient_harmonize(deltas, history=self.history)
        self.history = update_history(self.history, g)
        return g

    def state_dict(self) -> NDict:
        return {self.HISTORY + k: v for k, v in (self.history or {}).items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        n = len(self.HISTORY)
        self.history = {k[n:]: np.asarray(v, np.float64) for k, v in state.items()} or None
