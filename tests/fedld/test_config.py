"""One source of defaults: the CLI's options, the Flower app's run config and pyproject's
[tool.flwr.app.config] all follow robustlab.fedld.config.ExperimentConfig."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import typer

from robustlab.errors import UserError
from robustlab.fedld import config as C
from robustlab.fedld.cli import app as fedld_app

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _defaults() -> dict:
    return {f.name: C._default(f) for f in dataclasses.fields(C.ExperimentConfig)}


def test_pyproject_app_config_is_the_dataclass_defaults():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert table == C.run_config_defaults()
    # and every app field is there, under its run-config key, with its default (None written as none_as);
    # only the documented app defaults (flwr run . out of the box: digits, 2 SuperNodes, 3 rounds) differ
    d = _defaults()
    for f, opt in C.options("app"):
        want = opt.app_default if opt.has_app_default else d[f.name]
        assert table[C.run_key(f, opt)] == (opt.none_as if want is None else want), f.name
    assert {f.name for f, o in C.options() if o.has_app_default} == {
        "dataset",
        "clients",
        "rounds",
    }


def test_cli_options_are_the_dataclass_fields_with_their_defaults():
    import click

    command = typer.main.get_command(fedld_app).commands["run"]  # type: ignore[attr-defined]
    params = {p.name: p for p in command.params if isinstance(p, click.Option)}
    d = _defaults()
    cli_fields = {f.name for f, _ in C.options("cli")}
    assert set(params) == cli_fields | {"out"}
    for name in cli_fields:
        p = params[name]
        want = ",".join(d[name]) if name == "methods" else d[name]
        if name in ("data_dir", "weights"):
            want = None  # paths: the CLI fills the dataclass default in (see from_cli)
        assert p.default == want, name
    assert "--seed" in params["first_seed"].opts and "--pretrained" in params["pretrained"].opts
    # parsing the CLI's defaults gives the dataclass's defaults
    values = {name: params[name].default for name in cli_fields}
    assert C.from_cli(values) == C.ExperimentConfig()


def test_run_config_round_trip_and_unknown_keys():
    app = C.ExperimentConfig(dataset="digits", clients=2, rounds=3)
    assert C.app_defaults() == app
    assert C.from_run_config({}) == app
    assert C.from_run_config(C.run_config_defaults()) == app
    got = C.from_run_config(
        {"num-server-rounds": 7, "num-partitions": 3, "server-lr": 0.5, "pretrained": True}
    )
    assert (got.rounds, got.clients, got.server_lr, got.pretrained) == (7, 3, 0.5, True)
    assert C.from_run_config(C.to_run_config(got)) == got
    with pytest.raises(UserError, match="unknown run-config key"):
        C.from_run_config({"num-rounds": 3})


def test_every_field_says_where_it_applies_and_has_help():
    for f, opt in C.options():
        assert opt.where in ("both", "cli", "app") and opt.help.strip(), f.name


def test_library_defaults_are_the_dataclass_defaults():
    """The strategies' constructor keywords, the registry's and the ClientApp's fallbacks for a missing
    option and the task spec carry the same defaults as ExperimentConfig (a library user who builds a
    strategy by hand gets the CLI's settings)."""
    import inspect

    pytest.importorskip("flwr")
    from robustlab.fedld import client_app
    from robustlab.fedld import strategies as S
    from robustlab.fedld.strategies import registry
    from robustlab.fedld.strategies.aggregators import PrincipalGradients
    from robustlab.fedld.task import TaskSpec

    d = C.ExperimentConfig()

    def kw(cls, name):
        return inspect.signature(cls.__init__).parameters[name].default

    pairs = {
        (S.FedLD, "k_proportion"): d.k_proportion,
        (S.FedLD, "margin_lambda"): d.margin_lambda,
        (S.FedLDAggregationOnly, "k_proportion"): d.k_proportion,
        (S.FedLDMarginOnly, "margin_lambda"): d.margin_lambda,
        (PrincipalGradients, "k_proportion"): d.k_proportion,
        (S.FedProx, "proximal_mu"): d.proximal_mu,
        (S.MOON, "mu"): d.moon_mu,
        (S.MOON, "tau"): d.moon_tau,
        (S.FedPAC, "lam"): d.fedpac_lambda,
        (S.DeltaStrategy, "min_replies"): d.min_replies,
        (S.DeltaStrategy, "min_nodes"): d.min_nodes,
        (S.DeltaStrategy, "min_node_fraction"): d.min_node_fraction,
        (S.DeltaStrategy, "node_wait"): d.node_wait,
    }
    for (cls, name), want in pairs.items():
        assert kw(cls, name) == want, (cls.__name__, name)

    # a factory given no options builds the same strategy as one given the dataclass's values
    common = registry.common_options({})
    assert (common["min_replies"], common["min_nodes"], common["min_node_fraction"], common["node_wait"]) == (
        d.min_replies,
        d.min_nodes,
        d.min_node_fraction,
        d.node_wait,
    )
    fedld = registry.make_strategy("fedld", {})
    assert (fedld.k_proportion, fedld.margin_lambda) == (d.k_proportion, d.margin_lambda)
    assert registry.make_strategy("fedprox", {}).client_config()["proximal-mu"] == d.proximal_mu

    client = {
        "lr": d.lr,
        "momentum": d.momentum,
        "weight-decay": d.weight_decay,
        "batch-size": d.batch_size,
        "local-epochs": d.local_epochs,
        "moon-mu": d.moon_mu,
        "moon-tau": d.moon_tau,
        "fedpac-lambda": d.fedpac_lambda,
    }
    assert {k: client_app.DEFAULTS[k] for k in client} == client

    spec, back = TaskSpec(), TaskSpec.from_config({})
    assert spec == back
    assert (spec.dataset, spec.num_partitions, spec.beta, spec.seed, spec.min_partition_size) == (
        d.dataset,
        d.clients,
        d.beta,
        d.first_seed,
        d.min_partition_size,
    )
    assert (spec.model, spec.pretrained, spec.image_size, spec.weights, spec.sslfl_split) == (
        d.model,
        d.pretrained,
        d.image_size,
        d.weights,
        d.sslfl_split,
    )
