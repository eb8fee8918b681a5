"""FedLD on Flower: margin control, principal-gradient aggregation, baselines, medical-image experiments.

Names are exported lazily (module ``__getattr__``), so ``import robustlab.fedld`` does not import flwr,
torch or Ray; ``from robustlab.fedld import FedLD`` imports the strategies module on first use.

Strategies (Flower Message API, usable in any ``ServerApp``; one module per method under
:mod:`robustlab.fedld.strategies`): :class:`FedAvg`, :class:`FedProx`, :class:`FedAvgUnweighted`,
:class:`FedAvgServerLR`, :class:`FedLD`, :class:`FedLDMarginOnly`, :class:`FedLDAggregationOnly`,
:class:`FedGH`, :class:`FedBN`, :class:`Scaffold`, :class:`MOON`, :class:`FedPAC`; all are
:class:`DeltaStrategy` (``w <- w + server_lr * A(deltas)``) with an aggregator ``A``: :class:`FlowerMean`,
:class:`DeltaMean`, :class:`PrincipalGradients`, :class:`GradientHarmony`.
Apps: ``robustlab.fedld.client_app:app`` and ``robustlab.fedld.server_app:app`` (submodules).
Experiments: :func:`run_experiment`, :class:`ExperimentConfig`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Ray picks the host's outward-facing interface address for a single-machine simulation; keep every
# simulation on loopback (127.0.0.1) unless the user configured Ray otherwise. Set before Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

_EXPORTS: dict[str, str] = {
    # strategies
    "FedAvg": "robustlab.fedld.strategies",
    "FedProx": "robustlab.fedld.strategies",
    "FedAvgUnweighted": "robustlab.fedld.strategies",
    "FedAvgServerLR": "robustlab.fedld.strategies",
    "FedLD": "robustlab.fedld.strategies",
    "FedLDMarginOnly": "robustlab.fedld.strategies",
    "FedLDAggregationOnly": "robustlab.fedld.strategies",
    "FedGH": "robustlab.fedld.strategies",
    "FedBN": "robustlab.fedld.strategies",
    "Scaffold": "robustlab.fedld.strategies",
    "SCAFFOLD": "robustlab.fedld.strategies:Scaffold",
    "MOON": "robustlab.fedld.strategies",
    "FedPAC": "robustlab.fedld.strategies",
    "DeltaStrategy": "robustlab.fedld.strategies",
    "Aggregator": "robustlab.fedld.strategies",
    "FlowerMean": "robustlab.fedld.strategies",
    "DeltaMean": "robustlab.fedld.strategies",
    "PrincipalGradients": "robustlab.fedld.strategies",
    "GradientHarmony": "robustlab.fedld.strategies",
    "STRATEGIES": "robustlab.fedld.strategies",
    "make_strategy": "robustlab.fedld.strategies",
    # aggregation and losses (core library)
    "principal_gradient_aggregate": "robustlab.fedld.aggregation",
    "gradient_harmonize": "robustlab.fedld.aggregation",
    "update_size_ratio": "robustlab.fedld.aggregation",
    "margin_control_loss": "robustlab.fedld.losses",
    "fedprox_term": "robustlab.fedld.losses",
    # apps, task, experiments
    "run_training": "robustlab.fedld.server_app",
    "TaskSpec": "robustlab.fedld.task",
    "load_task": "robustlab.fedld.task",
    "ExperimentConfig": "robustlab.fedld.experiment",
    "run_experiment": "robustlab.fedld.experiment",
    "METHODS": "robustlab.fedld.experiment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'robustlab.fedld' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module_name), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
