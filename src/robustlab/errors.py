"""User-facing errors: what is wrong and how to fix it, printed by the CLI as one line (exit code 2)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (a value, a file, a combination of options).

    ``problem`` names what is wrong, ``fix`` says what to do instead. The CLI prints
    ``error: <problem>; <fix>`` on one line to stderr and exits with code 2, without a traceback.
    Internal errors are not ``UserError`` and keep their traceback.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = " ".join(str(problem).split())
        self.fix = " ".join(str(fix).split()) if fix else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


def check(condition: bool, problem: str, fix: str | None = None) -> None:
    """Raise ``UserError(problem, fix)`` unless ``condition`` holds."""
    if not condition:
        raise UserError(problem, fix)
