"""Where the staged real datasets live (``shared/data`` beside the checkout), if anywhere."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path | None:
    """``$ROBUSTLAB_SHARED_DATA``, else the first ``shared/data`` found above the package or the working
    directory (the checkout sits beside ``shared/``), else ``None``. Code must work without it."""
    env = os.environ.get("ROBUSTLAB_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for base in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in base.parents:
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None
