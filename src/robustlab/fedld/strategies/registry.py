"""The method registry: name -> (strategy factory, one-line description). A factory takes the experiment's
options (:func:`robustlab.fedld.experiment` builds them from :class:`~robustlab.fedld.config.ExperimentConfig`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from robustlab.fedld.config import ExperimentConfig
from robustlab.fedld.strategies.base import DeltaStrategy, evaluate_metrics_aggregate
from robustlab.fedld.strategies.fedavg import FedAvg, FedAvgServerLR, FedAvgUnweighted
from robustlab.fedld.strategies.fedbn import FedBN
from robustlab.fedld.strategies.fedgh import FedGH
from robustlab.fedld.strategies.fedld import FedLD, FedLDAggregationOnly, FedLDMarginOnly
from robustlab.fedld.strategies.fedpac import FedPAC
from robustlab.fedld.strategies.fedprox import FedProx
from robustlab.fedld.strategies.moon import MOON
from robustlab.fedld.strategies.scaffold import Scaffold

#: what an option missing from a factory's options falls back to: the one source of defaults
_D = ExperimentConfig()

#: method name -> (strategy factory, one-line description); factories take the experiment's options
STRATEGIES: dict[str, tuple[Callable[[Mapping[str, Any]], DeltaStrategy], str]] = {}


def _register(name: str, description: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        STRATEGIES[name] = (fn, description)
        return fn

    return deco


def common_options(o: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments every strategy takes (Flower's sampling minimums, the fault policy, the
    client-side evaluation aggregate), from the experiment's options."""
    n = int(o.get("num_clients", 2))
    return {
        "min_replies": int(o.get("min_replies", _D.min_replies)),
        "fraction_train": float(o.get("fraction_train", 1.0)),
        "fraction_evaluate": float(o.get("fraction_evaluate", _D.fraction_evaluate)),
        "min_train_nodes": min(n, int(o.get("min_train_nodes", n))),
        "min_evaluate_nodes": min(n, int(o.get("min_evaluate_nodes", n))),
        "min_available_nodes": min(n, int(o.get("min_available_nodes", n))),
        "evaluate_metrics_aggr_fn": evaluate_metrics_aggregate,
        "expected_nodes": n,
        "min_nodes": int(o.get("min_nodes", _D.min_nodes)),
        "min_node_fraction": float(o.get("min_node_fraction", _D.min_node_fraction)),
        "node_wait": float(o.get("node_wait", _D.node_wait)),
    }


@_register("fedavg", "FedAvg, sample-weighted mean (Flower's)")
def _fedavg(o: Mapping[str, Any]) -> FedAvg:
    return FedAvg(**common_options(o))


@_register("fedprox", "FedProx, (mu/2)||w - w_g||^2 on the clients")
def _fedprox(o: Mapping[str, Any]) -> FedProx:
    return FedProx(proximal_mu=float(o.get("proximal_mu", _D.proximal_mu)), **common_options(o))


@_register("fedavg-unweighted", "control: FedAvg with an unweighted mean")
def _fedavg_unweighted(o: Mapping[str, Any]) -> FedAvgUnweighted:
    return FedAvgUnweighted(**common_options(o))


@_register("fedavg-slr", "control: FedAvg with server lr = FedLD's measured update-size ratio")
def _fedavg_slr(o: Mapping[str, Any]) -> FedAvgServerLR:
    return FedAvgServerLR(server_lr=float(o["server_lr"]), **common_options(o))


@_register("fedld", "FedLD: margin control + principal-gradient aggregation")
def _fedld(o: Mapping[str, Any]) -> FedLD:
    return FedLD(
        k_proportion=float(o.get("k_proportion", _D.k_proportion)),
        margin_lambda=float(o.get("margin_lambda", _D.margin_lambda)),
        diagnostic_keys=o.get("param_keys"),
        **common_options(o),
    )


@_register("fedld-margin", "ablation: margin control only (FedAvg aggregation)")
def _fedld_margin(o: Mapping[str, Any]) -> FedLDMarginOnly:
    return FedLDMarginOnly(margin_lambda=float(o.get("margin_lambda", _D.margin_lambda)), **common_options(o))


@_register("fedld-pg", "ablation: principal-gradient aggregation only (CE clients)")
def _fedld_pg(o: Mapping[str, Any]) -> FedLDAggregationOnly:
    return FedLDAggregationOnly(
        k_proportion=float(o.get("k_proportion", _D.k_proportion)),
        diagnostic_keys=o.get("param_keys"),
        **common_options(o),
    )


@_register("fedgh", "FedGH as the FedLD repository runs it (pairwise gradient harmonisation)")
def _fedgh(o: Mapping[str, Any]) -> FedGH:
    return FedGH(**common_options(o))


@_register("fedbn", "FedBN: BatchNorm kept local (scored on the clients' own models)")
def _fedbn(o: Mapping[str, Any]) -> FedBN:
    return FedBN(local_keys=o["bn_keys"], **common_options(o))


@_register("scaffold", "SCAFFOLD: control variates (option II)")
def _scaffold(o: Mapping[str, Any]) -> Scaffold:
    return Scaffold(**common_options(o))


@_register("moon", "MOON: model-contrastive local loss")
def _moon(o: Mapping[str, Any]) -> MOON:
    return MOON(
        mu=float(o.get("moon_mu", _D.moon_mu)), tau=float(o.get("moon_tau", _D.moon_tau)), **common_options(o)
    )


@_register("fedpac", "FedPAC: prototype alignment + personalised heads (scored on the clients' own models)")
def _fedpac(o: Mapping[str, Any]) -> FedPAC:
    return FedPAC(
        lam=float(o.get("fedpac_lambda", _D.fedpac_lambda)),
        head_keys=o.get("head_keys") or ("head.weight", "head.bias"),
        **common_options(o),
    )


def make_strategy(method: str, options: Mapping[str, Any]) -> DeltaStrategy:
    """Build the strategy for ``method`` (a key of :data:`STRATEGIES`) from the experiment's options."""
    if method not in STRATEGIES:
        raise KeyError(method)
    return STRATEGIES[method][0](options)
