"""One source of FedLD's settings and their defaults: :class:`ExperimentConfig`.

Every field carries its help text and where it applies (:class:`Option`): the ``robustlab fedld run``
options are generated from the fields (:func:`cli_parameters`), the Flower app's run config
(``context.run_config``, ``flwr run --run-config``) is read through :func:`from_run_config`, and the
``[tool.flwr.app.config]`` table of ``pyproject.toml`` is :func:`run_config_defaults` (a test checks
that all three agree). Light module: no torch, flwr or Ray.

Where a field applies: ``both`` (the experiment CLI and the Flower app), ``cli`` (the simulation
experiment only: several methods and seeds, Ray resources) or ``app`` (the Flower app only: one method,
its output folder, client-side evaluation fraction). Run-config keys are the field names with ``-`` for
``_`` unless :attr:`Option.key` names another (Flower's ``num-server-rounds``); a run config has no
``None``, so ``None`` defaults appear there as :attr:`Option.none_as` (``""`` or ``0``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Where = Literal["both", "cli", "app"]


@dataclass(frozen=True)
class Option:
    help: str
    where: Where = "both"
    key: str | None = None  #: run-config key, when not the field name with dashes
    flag: str | None = None  #: CLI flag, when not ``--`` + the field name with dashes
    none_as: Any = None  #: how a ``None`` value is written in a run config
    path: bool = False  #: a path on the command line (checked by the CLI before the run)
    #: the Flower app's default where it differs: ``flwr run .`` works out of the box (no data to fetch, the
    #: 2 SuperNodes of Flower's default local simulation, a few rounds)
    app_default: Any = None
    has_app_default: bool = False


def _f(default: Any, help: str, **kw: Any) -> Any:
    if "app_default" in kw:
        kw["has_app_default"] = True
    return field(default=default, metadata={"option": Option(help, **kw)})


@dataclass
class ExperimentConfig:
    """One experiment: a dataset split among ``clients`` with Dirichlet(``beta``), methods x seeds.

    Defaults are the paper's local training (SGD lr 0.01, momentum 0.5, weight decay 5e-4, batch 50, one
    local epoch), FedLD's λ = 0.1 and k proportion 0.8, FedProx μ = 0.01, MOON μ = 1 and τ = 0.5, FedPAC's
    alignment weight λ = 1 (the official ``--lam``). ``server_lr`` (for ``fedavg-slr``) ``None`` means: the
    median of FedLD's update-size ratio over the rounds of the same seed.
    """

    dataset: str = _f(
        "retinamnist",
        "MedMNIST flag (file <flag>.npz in --data-dir), 'sslfl' or 'digits'.",
        app_default="digits",
    )
    data_dir: str | None = _f(
        None,
        "Folder with the MedMNIST .npz or the SSL-FL dataset (default ~/.medmnist).",
        none_as="",
        path=True,
    )
    sslfl_split: str = _f(
        "split_1", "SSL-FL split folder (split_1..3, split_real for COVID-FL's 12 clients)."
    )
    clients: int = _f(5, "Number of clients (SuperNodes).", key="num-partitions", app_default=2)
    beta: float = _f(0.5, "Dirichlet concentration of the label-skew split (> 0).")
    methods: list[str] = field(
        default_factory=lambda: ["fedavg", "fedprox", "fedld"],
        metadata={"option": Option("Comma-separated methods, or 'all'.", where="cli")},
    )
    method: str = _f("fedld", "The method the Flower app trains.", where="app")
    rounds: int = _f(100, "Federated rounds.", key="num-server-rounds", app_default=3)
    seeds: int = _f(1, "Number of seeds (seed, seed+1, ...).", where="cli")
    first_seed: int = _f(0, "First seed (drives split, init and batch order).", key="seed", flag="--seed")
    lr: float = _f(0.01, "Client SGD learning rate.")
    momentum: float = _f(0.5, "Client SGD momentum.")
    weight_decay: float = _f(5e-4, "Client weight decay.")
    batch_size: int = _f(50, "Client batch size.")
    local_epochs: int = _f(1, "Local epochs per round.")
    margin_lambda: float = _f(0.1, "FedLD margin-control weight λ.")
    k_proportion: float = _f(0.8, "FedLD: fraction of principal directions kept, in (0, 1].")
    proximal_mu: float = _f(0.01, "FedProx μ.")
    moon_mu: float = _f(1.0, "MOON contrastive weight μ.")
    moon_tau: float = _f(0.5, "MOON temperature τ.")
    fedpac_lambda: float = _f(1.0, "FedPAC feature-alignment weight λ.")
    server_lr: float | None = _f(
        None, "fedavg-slr server lr (default: FedLD's median update ratio; 0 in a run config).", none_as=0.0
    )
    min_partition_size: int = _f(10, "Smallest client partition the Dirichlet split accepts.")
    model: str = _f("cnn", "cnn, efficientnet-lite0, resnet18 or resnet50.")
    pretrained: bool = _f(
        False, "Start the backbone from ImageNet weights (--weights or the installed package)."
    )
    image_size: int = _f(0, "Image side the model sees, resized if needed (0 = the data's own).")
    weights: str = _f("", "Local ImageNet state_dict file for the backbone.", path=True)
    min_replies: int = _f(1, "Minimum usable client replies to aggregate a round (else the model is kept).")
    min_nodes: int = _f(
        0, "Fewest SuperNodes a round goes on with after --node-wait (0 = use --min-node-fraction)."
    )
    min_node_fraction: float = _f(0.5, "Fewest SuperNodes a round goes on with, as a fraction of --clients.")
    node_wait: float = _f(120.0, "Seconds a round waits for missing SuperNodes before going on without them.")
    round_timeout: float = _f(600.0, "Seconds to wait for the clients' replies each round.")
    fraction_evaluate: float = _f(1.0, "Fraction of clients that evaluate each round.", where="app")
    checkpoint: bool = _f(True, "Checkpoint every round into --out and resume from it.", where="app")
    out: str = _f("", "Folder for history.json and the checkpoint ('' = none).", where="app")
    num_cpus: int = _f(2, "CPUs Ray may use.", where="cli")
    client_cpus: float = _f(1.0, "CPUs per simulated client.", where="cli")

    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    def ordered_methods(self) -> list[str]:
        from robustlab.fedld.experiment import METHODS

        return sorted(dict.fromkeys(self.methods), key=METHODS.index)


#: fields that describe where and how a simulation runs, not what it computes (left out of config.yaml)
RUNTIME_FIELDS = ("num_cpus", "client_cpus")


def options(where: Where | None = None) -> list[tuple[dataclasses.Field, Option]]:
    """(field, option) pairs, in declaration order; ``where`` keeps those that apply there."""
    out = []
    for f in dataclasses.fields(ExperimentConfig):
        opt: Option = f.metadata["option"]
        if where is None or opt.where in (where, "both"):
            out.append((f, opt))
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def run_key(f: dataclasses.Field, opt: Option) -> str:
    return opt.key or f.name.replace("_", "-")


def _app_default(f: dataclasses.Field, opt: Option) -> Any:
    return opt.app_default if opt.has_app_default else _default(f)


def to_run_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg`` as Flower run-config entries (the app's keys; ``None`` written as ``none_as``)."""
    out = {}
    for f, opt in options("app"):
        value = getattr(cfg, f.name)
        out[run_key(f, opt)] = opt.none_as if value is None else value
    return out


def app_defaults() -> ExperimentConfig:
    """The config the Flower app runs with when the run config sets nothing."""
    return ExperimentConfig(**{f.name: _app_default(f, opt) for f, opt in options("app")})


def run_config_defaults() -> dict[str, Any]:
    """The Flower app's run-config keys and defaults: what ``[tool.flwr.app.config]`` must hold."""
    return to_run_config(app_defaults())


def from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The config a Flower app runs with: ``context.run_config`` over the defaults (types as declared;
    ``none_as`` values become ``None``). Unknown keys raise ``UserError``."""
    from robustlab.errors import UserError

    hints = typing.get_type_hints(ExperimentConfig)
    known = {run_key(f, opt): (f, opt) for f, opt in options("app")}
    unknown = sorted(set(run_config) - set(known))
    if unknown:
        raise UserError(f"unknown run-config key(s): {', '.join(unknown)}", f"use {', '.join(sorted(known))}")
    values: dict[str, Any] = {f.name: _app_default(f, opt) for f, opt in options("app")}
    for key, (f, opt) in known.items():
        if key not in run_config:
            continue
        v = run_config[key]
        if opt.none_as is not None and v == opt.none_as:
            values[f.name] = None
            continue
        base = _scalar_type(hints[f.name])
        values[f.name] = base(v) if base in (int, float, str) else bool(v)
    return ExperimentConfig(**values)


def _scalar_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def cli_parameters() -> list[tuple[str, Any, Any, Option]]:
    """(field name, type, default, option) of every ``robustlab fedld run`` option, for the CLI."""
    hints = typing.get_type_hints(ExperimentConfig)
    out = []
    for f, opt in options("cli"):
        t = _scalar_type(hints[f.name])
        if f.name == "methods":
            t, default = str, ",".join(_default(f))
        else:
            default = _default(f)
        if opt.path:
            t, default = Path, None
        out.append((f.name, t, default, opt))
    return out


def from_cli(values: Mapping[str, Any]) -> ExperimentConfig:
    """The config from the CLI's parsed options (paths to strings; ``methods`` parsed)."""
    from robustlab.fedld.experiment import parse_methods

    kw = dict(values)
    kw["methods"] = parse_methods(kw["methods"])
    for f, opt in options("cli"):
        if opt.path:
            v = kw.get(f.name)
            kw[f.name] = str(v) if v is not None else _default(f)
    return ExperimentConfig(**kw)
