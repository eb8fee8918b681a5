"""The ``robustlab`` command: one sub-app per system (mounted when the system exists) and ``reproduce``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import click
import typer

from robustlab import __version__
from robustlab.console import quiet_upstream
from robustlab.errors import UserError
from robustlab.paths import check_input_path, check_output_dir, check_output_file
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
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show the libraries' deprecation and future warnings."
    ),
) -> None:
    """robustlab: three robustness papers as tools."""
    quiet_upstream(verbose)


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


# Path options are checked before a command starts, so a bad one is one ``error:`` line and exit code 2
# with nothing written. An option is an *output folder* when it is declared ``writable=True`` or is named
# ``out`` (and not declared ``exists=True``); every other ``Path`` option must exist (a file when declared
# ``dir_okay=False``, a folder when declared ``file_okay=False`` or named ``*_dir``).
OUTPUT_NAMES = frozenset({"out"})
# An *output file* (overwritten; its folder must be creatable and writable): declared ``writable=True,
# dir_okay=False``, or named like one of these.
OUTPUT_FILE_NAMES = frozenset({"plot", "figure"})


class CheckedPath(click.ParamType):
    """A ``click.Path`` whose value goes through :mod:`robustlab.paths` first (``UserError``, not click's
    multi-line usage error)."""

    name = "path"

    def __init__(self, inner: click.Path, role: str, kind: str) -> None:
        self.inner, self.role, self.kind = inner, role, kind

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return self.inner.get_metavar(param, ctx)

    def to_info_dict(self) -> dict[str, Any]:
        return {**self.inner.to_info_dict(), "robustlab_role": self.role, "robustlab_kind": self.kind}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        flag = max(param.opts, key=len) if param is not None and param.opts else "path"
        if self.role == "output":
            check_output_dir(value, flag)
        elif self.role == "output file":
            check_output_file(value, flag)
        else:
            check_input_path(value, flag, self.kind)
        return self.inner.convert(value, param, ctx)


def path_role(param: click.Parameter) -> tuple[str, str] | None:
    """``(role, kind)`` of a path parameter (see ``OUTPUT_NAMES``), or ``None`` if it takes no path."""
    t = param.type.inner if isinstance(param.type, CheckedPath) else param.type
    if not isinstance(t, click.Path):
        return None
    kind = "file" if not t.dir_okay else "dir" if not t.file_okay or param.name.endswith("_dir") else "any"
    if t.exists:
        return "input", kind
    if (t.writable and kind == "file") or param.name in OUTPUT_FILE_NAMES:
        return "output file", "file"
    return ("output" if t.writable or param.name in OUTPUT_NAMES else "input"), kind


def _check_paths(command: click.Command) -> click.Command:
    for param in command.params:
        role = path_role(param)
        if role is not None and not isinstance(param.type, CheckedPath):
            param.type = CheckedPath(param.type, *role)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _check_paths(sub)
    return command


def build_command() -> click.Command:
    """The click command tree of ``robustlab``, every path option checked."""
    return _check_paths(typer.main.get_command(app))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: a ``UserError`` becomes one line on stderr and exit code 2."""
    quiet_upstream(verbose=False)  # before any command imports a library; ``--verbose`` undoes it
    try:
        build_command().main(args=argv, prog_name="robustlab", standalone_mode=True)
    except UserError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
