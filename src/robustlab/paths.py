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


# --------------------------------------------------------------------------- path arguments
#
# Every path a user passes is checked before any work starts, so that a bad one is one ``UserError`` line
# (exit code 2) and nothing is written. The CLI applies these to every ``Path`` option of every command
# (``robustlab.cli``); library entry points that create folders call :func:`check_output_dir` too.

_NAME_MAX = 255  # bytes per path component on every filesystem we meet (ext4, xfs, btrfs, tmpfs, APFS)


def _no_nul(path: str | os.PathLike, flag: str) -> Path:
    text = os.fspath(path)
    if "\0" in str(text):
        from robustlab.errors import UserError

        raise UserError(f"{flag} {text!r} contains a NUL byte", f"pass a valid path to {flag}")
    return Path(text).expanduser()


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` is, or can be made, a folder this process can write into; else ``UserError``.

    Nothing is left behind: the nearest existing ancestor is probed by creating and removing an empty
    temporary folder, which catches what permission bits alone do not (read-only filesystems, ``/proc``,
    running as root)."""
    from robustlab.errors import UserError

    p = _no_nul(path, flag)
    try:
        return _check_output_dir(p, flag)
    except OSError as exc:  # e.g. a path longer than PATH_MAX
        raise UserError(f"{flag} {p} is not a usable path ({exc.strerror})", f"pass another {flag}") from exc


def _check_output_dir(p: Path, flag: str) -> Path:
    import tempfile

    from robustlab.errors import UserError

    for part in p.parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise UserError(f"{flag} {p}: the name {part[:20]!r}... is too long", f"pass a shorter {flag}")
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file, not a folder", f"pass a folder path to {flag}")
    ancestor = p
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(
            f"{flag} {p} cannot be created: {ancestor} is a file", f"pass a folder path to {flag}"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".robustlab-probe-", dir=ancestor))
    except OSError as exc:
        reason = (exc.strerror or type(exc).__name__).lower()
        problem = (
            f"is not writable ({reason})" if ancestor == p else f"cannot be created in {ancestor} ({reason})"
        )
        raise UserError(f"{flag} {p} {problem}", f"pass a folder you can write to as {flag}") from exc
    return p


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` is a file this process can (over)write: not a folder, in a folder that is or can be made
    writable (checked as :func:`check_output_dir` does); else ``UserError``."""
    from robustlab.errors import UserError

    p = _no_nul(path, flag)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder, not a file", f"pass a file path to {flag}")
    check_output_dir(p.parent, flag)
    return p


def check_input_path(path: str | os.PathLike, flag: str, kind: str = "any") -> Path:
    """``path`` exists, is readable and is a ``file``, a ``dir`` or ``any`` of the two; else ``UserError``."""
    from robustlab.errors import UserError

    p = _no_nul(path, flag)
    noun = {"file": "file", "dir": "folder"}.get(kind, "file or folder")
    if not p.exists():
        raise UserError(f"{flag} {p} does not exist", f"pass an existing {noun} to {flag}")
    if kind == "file" and not p.is_file():
        raise UserError(f"{flag} {p} is not a file", f"pass a file to {flag}")
    if kind == "dir" and not p.is_dir():
        raise UserError(f"{flag} {p} is not a folder", f"pass a folder to {flag}")
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise UserError(f"{flag} {p} is not readable", f"check its permissions or pass another {noun}")
    return p
