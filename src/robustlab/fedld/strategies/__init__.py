"""Server strategies for FedLD and its baselines on Flower's Message API (``flwr.serverapp.strategy``).

Every method is one :class:`~robustlab.fedld.strategies.base.DeltaStrategy` (a Flower ``Strategy`` that any
``ServerApp`` can use, ``strategy.start(grid, ...)``): ``w <- w + server_lr * A(deltas)`` with a pluggable
aggregator ``A`` (:mod:`~robustlab.fedld.strategies.aggregators`), a reply filter, bounded waits for lost
SuperNodes, checkpointable state and per-round diagnostics; a method's module adds only what its clients
must be told and what its server keeps:

=================  ==========================================================  ===============================
module             classes                                                      aggregator
=================  ==========================================================  ===============================
``fedavg``         FedAvg, FedAvgUnweighted, FedAvgServerLR (controls)          FlowerMean, DeltaMean
``fedprox``        FedProx                                                      FlowerMean
``fedld``          FedLD, FedLDMarginOnly, FedLDAggregationOnly (ablations)     PrincipalGradients, FlowerMean
``fedgh``          FedGH (the FedLD repository's variant)                       GradientHarmony
``fedbn``          FedBN (scored on the clients' own models)                    FlowerMean
``scaffold``       Scaffold                                                     DeltaMean
``moon``           MOON                                                         FlowerMean
``fedpac``         FedPAC (scored on the clients' own models)                   its ModelMean + head combination
=================  ==========================================================  ===============================

``registry`` maps the CLI's method names to factories (:data:`STRATEGIES`, :func:`make_strategy`).
"""

from robustlab.fedld.strategies.aggregators import DeltaMean, FlowerMean, GradientHarmony, PrincipalGradients
from robustlab.fedld.strategies.base import (
    Aggregator,
    ClientUpdates,
    DeltaStrategy,
    ReplyFilter,
    evaluate_metrics_aggregate,
)
from robustlab.fedld.strategies.fedavg import FedAvg, FedAvgServerLR, FedAvgUnweighted
from robustlab.fedld.strategies.fedbn import FedBN
from robustlab.fedld.strategies.fedgh import FedGH
from robustlab.fedld.strategies.fedld import FedLD, FedLDAggregationOnly, FedLDMarginOnly
from robustlab.fedld.strategies.fedpac import FedPAC
from robustlab.fedld.strategies.fedprox import FedProx
from robustlab.fedld.strategies.moon import MOON
from robustlab.fedld.strategies.registry import STRATEGIES, make_strategy
from robustlab.fedld.strategies.scaffold import Scaffold

__all__ = [
    "MOON",
    "STRATEGIES",
    "Aggregator",
    "ClientUpdates",
    "DeltaMean",
    "DeltaStrategy",
    "FedAvg",
    "FedAvgServerLR",
    "FedAvgUnweighted",
    "FedBN",
    "FedGH",
    "FedLD",
    "FedLDAggregationOnly",
    "FedLDMarginOnly",
    "FedPAC",
    "FedProx",
    "FlowerMean",
    "GradientHarmony",
    "PrincipalGradients",
    "ReplyFilter",
    "Scaffold",
    "evaluate_metrics_aggregate",
    "make_strategy",
]
