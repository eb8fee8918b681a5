"""Run folders: config snapshot, environment record, metrics log, summary; atomic writes; resume.

A run folder holds::

    config.yaml     the resolved configuration (what was asked for)
    env.json        Python and package versions, seed, CPU/GPU, git commit
    metrics.jsonl   one JSON object per line (step / round / episode block), appended as work finishes
    summary.json    the final numbers
    cells/          one JSON file per finished unit of work (cell, round, stage) for resume

Every whole-file write goes through a temporary file in the same folder plus ``os.replace``, so a crash
leaves either the old file or the new one, never half of one. ``metrics.jsonl`` is appended line by line;
a line cut short by a crash is dropped when the log is read or reopened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import re
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import yaml

from robustlab.errors import UserError
from robustlab.paths import check_output_dir

T = TypeVar("T")

PACKAGES = (
    "robustlab",
    "numpy",
    "scipy",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "tokenizers",
    "safetensors",
    "flwr",
    "flwr-datasets",
    "ray",
    "scikit-learn",
    "matplotlib",
    "typer",
)


# --------------------------------------------------------------------------- atomic writes


def current_umask() -> int:
    """The process's umask, read without changing it where Linux exposes it (``/proc/self/status``);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_write_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: an existing file keeps its mode, a new one gets
    0o666 minus the umask (0o644 under the usual 022). ``mkstemp`` alone would leave 0o600."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename; the file gets
    the permissions a plain write would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _normal_write_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, paths, numpy scalars/arrays and tuples into plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON; keep it visible as null
        return None
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(to_jsonable(obj), sort_keys=False))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines log, dropping a last line that a crash cut short."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only the tail can be torn: appends are sequential
    return rows


def _repair_jsonl(path: Path) -> None:
    """Cut a torn last line so that appends continue from a clean line boundary."""
    if not path.exists():
        return
    good = read_jsonl(path)
    text = "".join(json.dumps(r) + "\n" for r in good)
    if text.encode("utf-8") != path.read_bytes():
        atomic_write_text(path, text)


# --------------------------------------------------------------------------- environment


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_info(seed: int | None = None) -> dict[str, Any]:
    """Python and package versions, seed, CPU/GPU and git commit: enough to reproduce a number."""
    info: dict[str, Any] = {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "seed": seed,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
    if "torch" in sys.modules:  # report the accelerator only where torch is already in use
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = bool(torch.cuda.is_available())
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and (when loaded) torch's generators from one seed."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def config_hash(config: Any) -> str:
    blob = json.dumps(to_jsonable(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- run folder

_SAFE_KEY = re.compile(r"[^A-Za-z0-9._=-]+")


def cell_key(**parts: Any) -> str:
    """A file-safe key for one unit of work, e.g. ``cell_key(algo="alg2", K=1000, seed=3)``."""
    return "__".join(f"{k}={_SAFE_KEY.sub('-', str(v))}" for k, v in parts.items())


class RunDir:
    """One run folder. Create it with :meth:`open`; rerunning the same command reopens it and resumes.

    ``resume_keys`` names the config entries that must match to resume (all of them by default):
    reopening a folder that holds a different config raises ``UserError`` rather than mixing results.
    Entries outside ``resume_keys`` (e.g. the number of workers) may change between the two runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- creation
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        config: Any,
        seed: int | None = None,
        resume_keys: Iterable[str] | None = None,
        overwrite: bool = False,
    ) -> RunDir:
        path = check_output_dir(path)
        config = to_jsonable(config)
        run = cls(path)
        if overwrite and path.exists():
            import shutil

            shutil.rmtree(path)
        cfg_file = path / "config.yaml"
        if cfg_file.exists():
            old = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
            keys = set(resume_keys) if resume_keys is not None else set(old) | set(config)
            diff = sorted(k for k in keys if old.get(k) != config.get(k))
            if diff:
                raise UserError(
                    f"{path} holds a run with a different configuration (differs in: {', '.join(diff)})",
                    "choose another --out folder, or rerun with the same settings to resume",
                )
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_yaml(cfg_file, config)
        atomic_write_json(path / "env.json", environment_info(seed))
        _repair_jsonl(path / "metrics.jsonl")
        return run

    # -- metrics and summary
    def log(self, **metrics: Any) -> None:
        """Append one line to ``metrics.jsonl`` (flushed and fsynced, so a crash loses at most this line)."""
        line = json.dumps(to_jsonable(metrics)) + "\n"
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    def write_summary(self, summary: Any) -> Path:
        return atomic_write_json(self.path / "summary.json", summary)

    def summary(self) -> Any | None:
        p = self.path / "summary.json"
        return read_json(p) if p.exists() else None

    # -- resume
    def _cell_path(self, key: str) -> Path:
        if not key or _SAFE_KEY.search(key):
            raise ValueError(f"cell key {key!r} must match [A-Za-z0-9._=-]+ (use cell_key())")
        return self.path / "cells" / f"{key}.json"

    def is_done(self, key: str) -> bool:
        return self._cell_path(key).exists()

    def load(self, key: str) -> Any:
        return read_json(self._cell_path(key))

    def save(self, key: str, result: Any) -> Path:
        """Mark a unit of work finished by writing its result atomically."""
        return atomic_write_json(self._cell_path(key), result)

    def done_keys(self) -> list[str]:
        d = self.path / "cells"
        return sorted(p.stem for p in d.glob("*.json")) if d.exists() else []

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        """Return the saved result of ``key``, or compute it, save it and return it."""
        if self.is_done(key):
            return self.load(key)
        result = compute()
        self.save(key, result)
        return result


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def track(iterable: Iterable[T], description: str = "", total: int | None = None) -> Iterator[T]:
    """A rich progress bar on a terminal; silent (plain iteration) otherwise."""
    if not sys.stderr.isatty():
        yield from iterable
        return
    from rich.progress import track as rich_track

    yield from rich_track(iterable, description=description, total=total, transient=True)
