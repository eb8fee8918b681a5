"""The ``robustlab`` command: one sub-app per system (mounted when the system exists) and ``reproduce``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import typer

from robustlab import __version__
from robustlab.errors import UserError
from robustlab.reproduce import SYSTEMS, parse_only, run_reproduce

app = typer.Typer(
    name="robustlab",
    help="Antidote, FedLD and refined-regret adversarial linear MDPs: run the papers' methods on your "
    "own models and data, and reproduce their results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"robustlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """robustlab: three robustness papers as tools."""


@app.command()
def reproduce(
    quick: bool = typer.Option(False, "--quick", help="Laptop scale (minutes; the default)."),
    full: bool = typer.Option(False, "--full", help="The papers' scale where feasible (hours)."),
    only: str = typer.Option(None, "--only", help=f"Comma-separated subset of: {', '.join(SYSTEMS)}."),
    out: Path = typer.Option(None, "--out", help="Report folder [default: runs/reproduce/<timestamp>]."),
    seed: int = typer.Option(0, "--seed", help="Seed for every random choice."),
) -> None:
    """Reproduce the papers' experiments into one report (report.md, report.html, results.json)."""
    if quick and full:
        raise UserError("--quick and --full were both given", "pass one of them")
    html, outcomes = run_reproduce("full" if full else "quick", parse_only(only), out, seed, typer.echo)
    typer.echo(f"report: {html}")
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(1)


def _mount_systems() -> None:
    """Mount ``robustlab.<system>.cli:app`` for each system that exists; the others are not listed."""
    for name, title in SYSTEMS.items():
        module_name = f"robustlab.{name}.cli"
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:
            continue
        module = importlib.import_module(module_name)
        app.add_typer(module.app, name=name, help=title)


_mount_systems()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: a ``UserError`` becomes one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="robustlab", standalone_mode=True)
    except UserError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
