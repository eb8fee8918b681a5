"""``robustlab fedld``: run FedLD and its baselines on Flower's simulation engine.

Module-level imports stay light (no torch / flwr / ray): ``robustlab --help`` imports this module. The
options of ``run`` are generated from :class:`robustlab.fedld.config.ExperimentConfig` (one source of
defaults for the CLI, the Flower run config and ``[tool.flwr.app.config]``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(
    help="FedLD (margin control + principal-gradient aggregation) and baselines on Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def run(**options: Any) -> None:
    """Run (or resume) an experiment: every method x seed, per-round evaluation, summary, table, plots."""
    from robustlab.fedld.config import from_cli
    from robustlab.fedld.experiment import run_experiment, summary_table
    from robustlab.report import markdown_table

    out = options.pop("out")
    if options["data_dir"] is None and options["dataset"] not in ("digits", "sslfl"):
        options["data_dir"] = Path("~/.medmnist").expanduser()
    summary = run_experiment(from_cli(options), out, echo=typer.echo)
    cols, rows = summary_table(summary)
    typer.echo(markdown_table(cols, rows))
    typer.echo(f"summary: {Path(out) / 'summary.json'}")


def _run_signature() -> inspect.Signature:
    """``run``'s options, one per field of :class:`robustlab.fedld.config.ExperimentConfig` that applies to
    the CLI (names, defaults and help from there), and the required ``--out``."""
    from robustlab.fedld.config import cli_parameters

    params = [
        inspect.Parameter(
            "out",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(..., "--out", help="Run folder (a rerun with the same settings resumes)."),
            annotation=Path,
        )
    ]
    for name, kind, default, opt in cli_parameters():
        flag = opt.flag or "--" + name.replace("_", "-")
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(default, flag, help=opt.help),
                annotation=Optional[kind] if default is None else kind,  # noqa: UP045 - typer reads it
            )
        )
    return inspect.Signature(params)


run.__signature__ = _run_signature()  # type: ignore[attr-defined]
app.command()(run)


@app.command()
def methods() -> None:
    """List the methods."""
    from robustlab.fedld.experiment import LABELS, METHODS

    for m in METHODS:
        typer.echo(f"{m:20s} {LABELS[m]}")
