"""What a person sees while a command runs: upstream warnings kept out of the way, and stage progress.

- :func:`quiet_upstream` is installed by the ``robustlab`` entry point. It hides deprecation and future
  warnings raised inside the libraries we call (in this process and, through ``PYTHONWARNINGS``, in the
  worker processes it starts) and Flower's deprecation banners; ``robustlab --verbose`` shows them all.
- :class:`Stages` reports finished stages: a rich progress bar with elapsed time and an estimate of the
  time left on a terminal, one line per finished stage otherwise (piped into a file or ``tee``).
- :func:`watch_run` feeds a :class:`Stages` from a run folder's ``metrics.jsonl`` as other processes
  append to it, for work that runs in worker processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

# Categories that announce upstream API changes: useful to a developer, noise to a user of robustlab.
QUIET_CATEGORIES: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_PYTHONWARNINGS = ",".join(f"ignore::{c.__name__}" for c in QUIET_CATEGORIES)
# Flower logs these at WARNING level: the deprecation banners and the note that a simulation actor is
# stopped at the end of a run (which is how every simulation ends).
_FLOWER_NOISE = ("DEPRECATED FEATURE", "FEATURE UPDATE", "Manually terminating")


class _DropFlowerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(str(record.msg).lstrip().startswith(n) for n in _FLOWER_NOISE)


_FLOWER_FILTER = _DropFlowerNoise()


def quiet_upstream(verbose: bool = False) -> None:
    """Hide upstream deprecation/future warnings and Flower's banners, or (``verbose``) show everything.

    Worker processes inherit the choice: ``PYTHONWARNINGS`` carries the warning filters into every Python
    child (spawned workers, Ray's workers), and ``ROBUSTLAB_QUIET=1`` makes ``import robustlab`` there
    install the Flower log filter too (Ray's actors log Flower's end-of-run warning themselves)."""
    flwr_logger = logging.getLogger("flwr")
    if verbose:
        os.environ.pop("ROBUSTLAB_QUIET", None)
        if os.environ.get("PYTHONWARNINGS") == _PYTHONWARNINGS:
            del os.environ["PYTHONWARNINGS"]
        for category in QUIET_CATEGORIES:
            warnings.filterwarnings("default", category=category)
        flwr_logger.removeFilter(_FLOWER_FILTER)
        return
    for category in QUIET_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("PYTHONWARNINGS", _PYTHONWARNINGS)
    os.environ["ROBUSTLAB_QUIET"] = "1"
    if _FLOWER_FILTER not in flwr_logger.filters:
        flwr_logger.addFilter(_FLOWER_FILTER)


def _format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class Stages:
    """Progress over ``total`` stages (``None`` when unknown) of one job, labelled ``label``.

    On a terminal (``stream.isatty()``): a transient rich bar with a count, elapsed time and an estimate
    of the time left, and each finished stage's line printed above it. Otherwise: one line per stage,
    ``<label>: <stage> (<done>/<total> <unit>, <elapsed> elapsed)``. ``advance()`` counts without a
    line (for many small steps inside a stage)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        stream: TextIO | None = None,
        live: bool | None = None,
        unit: str = "",
    ) -> None:
        self.label = label
        self.total = total
        self.unit = f" {unit}" if unit else ""
        self.done = 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Stages:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("elapsed"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._progress is not None:
                self._progress.update(self._task, advance=n)

    def stage(self, name: str, advance: int = 1) -> None:
        """A stage finished: count it and say so in one line (on a terminal, above the bar)."""
        with self._lock:
            self.done += advance
            count = (f"{self.done}/{self.total}" if self.total else f"{self.done}") + self.unit
            line = f"{self.label}: {name} ({count}, {_format_seconds(self.elapsed())} elapsed)"
            if self._progress is not None:
                self._progress.update(self._task, advance=advance)
                self._progress.console.print(line, highlight=False, markup=False)
                return
            print(line, file=self.stream, flush=True)


def watch_run(
    folder: str | Path,
    st: Stages,
    describe: Callable[[dict[str, Any]], tuple[str | None, int]],
    interval: float = 1.0,
) -> contextlib.AbstractContextManager[None]:
    """While the ``with`` block runs, read rows appended to ``folder/metrics.jsonl`` (by any process) and
    report them: ``describe(row)`` returns ``(stage name or None, how many units it completes)``. Rows
    already there (a resumed run) count towards the total without a line."""
    return _Watcher(Path(folder) / "metrics.jsonl", st, describe, interval)


class _Watcher:
    def __init__(self, path: Path, st: Stages, describe: Callable, interval: float) -> None:
        self.path, self.st, self.describe, self.interval = path, st, describe, interval
        self._stop = threading.Event()
        self._offset = 0
        self._replay = True
        self._poll()
        self._replay = False
        self._thread = threading.Thread(target=self._loop, name="robustlab-watch", daemon=True)

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the rows written just before the block ended

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # only whole lines; a line being written is read next time
        self._offset += end
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            name, units = self.describe(row)
            if name and not self._replay:
                self.st.stage(name, units)
            elif units:
                self.st.advance(units)
