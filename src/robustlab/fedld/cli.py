"""``robustlab fedld``: run FedLD and its baselines on Flower's simulation engine.

Module-level imports stay light (no torch / flwr / ray): ``robustlab --help`` imports this module.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="FedLD (margin control + principal-gradient aggregation) and baselines on Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def run(
    dataset: str = typer.Option(
        "retinamnist", help="MedMNIST flag (file <flag>.npz in --data-dir) or 'digits'."
    ),
    data_dir: Path = typer.Option(
        None, "--data-dir", help="Folder with the MedMNIST .npz [default: ~/.medmnist]."
    ),
    clients: int = typer.Option(5, help="Number of clients (SuperNodes)."),
    beta: float = typer.Option(0.5, help="Dirichlet concentration of the label-skew split (> 0)."),
    methods: str = typer.Option("fedavg,fedprox,fedld", help="Comma-separated methods, or 'all'."),
    rounds: int = typer.Option(100, help="Federated rounds."),
    seeds: int = typer.Option(1, help="Number of seeds (seed, seed+1, ...)."),
    seed: int = typer.Option(0, help="First seed (drives split, init and batch order)."),
    out: Path = typer.Option(..., "--out", help="Run folder (a rerun with the same settings resumes)."),
    lr: float = typer.Option(0.01, help="Client SGD learning rate."),
    momentum: float = typer.Option(0.5, help="Client SGD momentum."),
    weight_decay: float = typer.Option(5e-4, help="Client weight decay."),
    batch_size: int = typer.Option(50, help="Client batch size."),
    local_epochs: int = typer.Option(1, help="Local epochs per round."),
    margin_lambda: float = typer.Option(0.1, help="FedLD margin-control weight λ."),
    k_proportion: float = typer.Option(0.8, help="FedLD: fraction of principal directions kept, in (0, 1]."),
    proximal_mu: float = typer.Option(0.01, help="FedProx μ."),
    fedpac_lambda: float = typer.Option(1.0, help="FedPAC feature-alignment weight λ."),
    server_lr: float = typer.Option(
        None, help="fedavg-slr server lr [default: FedLD's median update ratio]."
    ),
    min_replies: int = typer.Option(1, help="Minimum client replies to aggregate a round."),
    round_timeout: float = typer.Option(600.0, help="Seconds to wait for the clients each round."),
    num_cpus: int = typer.Option(2, help="CPUs Ray may use."),
    model: str = typer.Option("cnn", help="cnn, efficientnet-lite0, resnet18 or resnet50."),
    pretrained: bool = typer.Option(
        False,
        "--pretrained",
        help="Start the backbone from ImageNet weights (--weights or the installed package).",
    ),
    image_size: int = typer.Option(
        0, help="Image side the model sees, resized if needed [default: the data's]."
    ),
    weights: Path = typer.Option(None, "--weights", help="Local ImageNet state_dict file for the backbone."),
) -> None:
    """Run (or resume) an experiment: every method x seed, per-round evaluation, summary, table, plots."""
    from robustlab.fedld.experiment import ExperimentConfig, parse_methods, run_experiment, summary_table
    from robustlab.report import markdown_table

    if data_dir is None and dataset != "digits":
        data_dir = Path("~/.medmnist").expanduser()
    cfg = ExperimentConfig(
        dataset=dataset,
        data_dir=str(data_dir) if data_dir is not None else None,
        clients=clients,
        beta=beta,
        methods=parse_methods(methods),
        rounds=rounds,
        seeds=seeds,
        first_seed=seed,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        local_epochs=local_epochs,
        margin_lambda=margin_lambda,
        k_proportion=k_proportion,
        proximal_mu=proximal_mu,
        fedpac_lambda=fedpac_lambda,
        server_lr=server_lr,
        min_replies=min_replies,
        round_timeout=round_timeout,
        num_cpus=num_cpus,
        model=model,
        pretrained=pretrained,
        image_size=image_size,
        weights=str(weights) if weights is not None else "",
    )
    summary = run_experiment(cfg, out, echo=typer.echo)
    cols, rows = summary_table(summary)
    typer.echo(markdown_table(cols, rows))
    typer.echo(f"summary: {Path(out) / 'summary.json'}")


@app.command()
def methods() -> None:
    """List the methods."""
    from robustlab.fedld.experiment import LABELS, METHODS

    for m in METHODS:
        typer.echo(f"{m:20s} {LABELS[m]}")
