"""Loading a user's fine-tuned model the way Antidote sees it, and the one-call ``realign`` for files on disk.

The paper's two-adapter setup (``train.py`` L254-312 of the official code; ``papers/antidote.md`` §1.3):
the *alignment* LoRA adapter is loaded on the base model and merged (``merge_and_unload``); the user's
*fine-tuning* adapter is then loaded on top, unmerged, so that re-alignment prunes only its A and B matrices.
A fully fine-tuned model is just ``base`` with no adapters.

A base model is a local Hugging Face folder, a hub id (online), a ``.gguf`` file or a built-in offline name
(``smollm2-135m-instruct``, ``gemma3-270m``); see :mod:`robustlab.antidote.sources`. An adapter is a local
folder or a hub id. Where and in which precision the model runs is a :class:`~robustlab.antidote.runtime.Runtime`.

Inputs are checked before anything heavy happens: missing folders or files, base weights not in
safetensors, an adapter whose ``base_model_name_or_path`` or tensor shapes do not fit the base, and hub ids
while offline all raise :class:`~robustlab.errors.UserError`. Base weights load through safetensors only;
an adapter saved as ``adapter_model.bin`` is read with ``torch.load(weights_only=True)`` (tensors only, no
pickled code) and handed to peft as safetensors. ``trust_remote_code`` stays off unless the caller passes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from robustlab.antidote.runtime import Runtime
from robustlab.antidote.sources import BUILTIN_MODELS, resolve_base
from robustlab.errors import UserError

__all__ = [
    "ALPACA_NO_INPUT",
    "calibration_texts",
    "check_adapter",
    "load_model",
    "read_calibration_file",
    "realign_from_paths",
    "resolve_adapter",
]

#: The official Alpaca "no input" template (``utils.py`` PROMPT_DICT, with the trailing newline after
#: "### Response:" added in commit 0afc720): re-alignment samples are this prompt + harmful answer + EOS.
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


# --------------------------------------------------------------------------- checks


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    if any(f and f.strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def _check_base_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path} has no config.json, so it is not a Hugging Face model folder",
            "pass the folder save_pretrained wrote",
        )
    has_st = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    if not has_st:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickled:
            raise UserError(
                f"{path} holds weights only as pickle files ({', '.join(sorted(pickled)[:2])}), which are not loaded",
                "convert them to safetensors (model.save_pretrained(dir, safe_serialization=True)) and retry",
            )
        raise UserError(
            f"{path} has no model weights (*.safetensors)", "pass the folder save_pretrained wrote"
        )


#: Files of an adapter repository worth downloading (weights, config, a tokenizer saved beside it).
_ADAPTER_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "*.model",
]


def resolve_adapter(adapter: str | os.PathLike, role: str = "fine-tuning") -> Path:
    """A local adapter folder, or the local snapshot of a hub id ``org/name`` (adapter files only; from the
    local cache when offline). A path that does not exist is returned as is, for
    :func:`_read_adapter_config` to report."""
    text = str(adapter)
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1 or text.endswith("/"):
        return path
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        return Path(snapshot_download(text, allow_patterns=_ADAPTER_FILES, local_files_only=offline))
    except Exception as exc:  # the hub raises many kinds (offline, 404, gated, network)
        where = "in the local hub cache (offline mode is on)" if offline else "locally or on the hub"
        raise UserError(
            f"{role} adapter {text} is not a folder, and no hub repo of that id was found {where}",
            "pass the folder peft's save_pretrained wrote, or a reachable hub id",
        ) from exc


def _adapter_weights(path: Path) -> Path | None:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    return None


def _read_adapter_config(path: Path, role: str) -> dict:
    if not path.exists():
        raise UserError(f"{role} adapter folder {path} does not exist", "check the path")
    if not path.is_dir():
        raise UserError(
            f"{role} adapter {path} is not a folder", "pass the folder peft's save_pretrained wrote"
        )
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(
            f"{role} adapter {path} has no adapter_config.json",
            "pass the folder peft's save_pretrained wrote",
        )
    if _adapter_weights(path) is None:
        raise UserError(
            f"{role} adapter {path} has no adapter_model.safetensors (or adapter_model.bin)",
            "pass the folder peft's save_pretrained wrote",
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path} is not valid JSON ({exc})", "re-save the adapter") from exc
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(
            f"{role} adapter {path} is a {cfg.get('peft_type')} adapter, not LoRA", "pass a LoRA adapter"
        )
    return cfg


def _load_bin(path: Path) -> dict[str, Any]:
    """An ``adapter_model.bin`` through ``torch.load(weights_only=True)``: tensors only, no pickled code."""
    import pickle

    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise UserError(
            f"{path} is not a plain tensor state dict ({str(exc).splitlines()[0][:160]})",
            "save the adapter as safetensors (save_pretrained(..., safe_serialization=True))",
        ) from exc
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors", "re-save the adapter")
    return state


def _adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    weights = _adapter_weights(path)
    assert weights is not None  # _read_adapter_config checked it
    if weights.suffix == ".bin":
        return {k: tuple(v.shape) for k, v in _load_bin(weights).items()}
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a mapping


@contextlib.contextmanager
def _safetensors_adapter(path: Path) -> Iterator[Path]:
    """``path`` itself when it holds safetensors; else a temporary copy whose weights were read with
    ``torch.load(weights_only=True)`` and written as safetensors, so peft never unpickles anything."""
    weights = _adapter_weights(path)
    if weights is None or weights.suffix != ".bin":
        yield path
        return
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="robustlab-adapter-") as tmp:
        shutil.copy(path / "adapter_config.json", Path(tmp) / "adapter_config.json")
        state = {k: v.contiguous() for k, v in _load_bin(weights).items()}
        save_file(state, str(Path(tmp) / "adapter_model.safetensors"))
        yield Path(tmp)


def _name_key(s: str) -> str:
    return str(s).rstrip("/").replace("\\", "/").split("/")[-1].lower()


def _same_model_name(a: str, b: str) -> bool:
    key = _name_key
    if not a or not b:
        return True
    if a == b:
        return True
    with_a, with_b = Path(a).expanduser(), Path(b).expanduser()
    if with_a.exists() and with_b.exists():
        return with_a.resolve() == with_b.resolve()
    return key(a) == key(b)


def _layer_dims(module: Any) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear, Conv1D or LoRA-wrapped layer."""
    base = getattr(module, "base_layer", module)
    weight = getattr(base, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    if type(base).__name__ == "Conv1D":
        return int(weight.shape[0]), int(weight.shape[1])
    if type(base).__name__ == "Embedding":
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.*)\.lora_(A|B|embedding_A|embedding_B)(?:\.[^.]+)?\.weight$"
)


def check_adapter(
    model: Any,
    adapter: str | os.PathLike,
    base_name: str | Sequence[str] | None = None,
    role: str = "fine-tuning",
    merged_from: str | os.PathLike | None = None,
) -> dict:
    """Check that the LoRA adapter folder fits ``model`` (a transformers model, alignment adapter merged).

    ``base_model_name_or_path`` must name the same model as ``base_name`` (or one of several names of the
    base: same string, same folder, or the same last path component, e.g. a hub id and a local copy of it),
    and every ``lora_A``/``lora_B`` tensor must fit the module it adapts. ``merged_from``: the alignment
    adapter merged into ``model``; an adapter trained on that merged model may record a folder of the same
    last name as the alignment adapter's (a pipeline's saved stage). Returns the adapter config; raises
    :class:`UserError` otherwise.
    """
    path = Path(adapter).expanduser()
    cfg = _read_adapter_config(path, role)
    recorded = cfg.get("base_model_name_or_path")
    names = [base_name] if isinstance(base_name, (str, os.PathLike)) else list(base_name or [])
    on_merged = merged_from is not None and recorded and _name_key(recorded) == _name_key(merged_from)
    if (
        names
        and recorded
        and not on_merged
        and not any(_same_model_name(str(recorded), str(n)) for n in names)
    ):
        raise UserError(
            f"the {role} adapter {path} was trained on {recorded}, not on {names[0]}",
            "pass the base model the adapter was trained on (or fix base_model_name_or_path in adapter_config.json if it is the same model under another path)",
        )
    modules = dict(model.named_modules())
    for key, shape in _adapter_shapes(path).items():
        m = _LORA_KEY.match(key)
        if not m:
            continue
        target, part = m.group(1), m.group(2)
        module = modules.get(target)
        if module is None:
            raise UserError(
                f"the {role} adapter {path} adapts {target}, which the base model does not have",
                "pass the base model the adapter was trained on",
            )
        dims = _layer_dims(module)
        if dims is None or len(shape) != 2:
            continue
        in_f, out_f = dims
        ok = shape[1] == in_f if part == "A" else shape[0] == out_f if part == "B" else True
        if not ok:
            raise UserError(
                f"the {role} adapter {path} does not fit the base model: {key} has shape {shape} but {target} is {in_f}->{out_f}",
                "pass the base model the adapter was trained on",
            )
    return cfg


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Hide transformers' deprecation chatter that peft triggers while loading an adapter."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        yield


def load_model(
    base: str | os.PathLike,
    align_adapter: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    runtime: Runtime | None = None,
    log: Any = None,
) -> tuple[Any, Any]:
    """Load ``base``, merge ``align_adapter`` into it, and load the fine-tuning ``adapter`` on top
    (unmerged). Returns ``(model, tokenizer)`` with the model in eval mode, on ``runtime``'s device (or
    spread by its device map) in its dtype; ``runtime`` defaults to :meth:`Runtime.current` (the command's
    flags, else ``auto``).

    ``base`` is a local folder, a hub id (online), a ``.gguf`` file or a built-in name
    (:data:`~robustlab.antidote.sources.BUILTIN_MODELS`; GGUF checkpoints are dequantised into the cache
    once, announced through ``log``). Adapters are local folders or hub ids. The tokenizer comes from the
    fine-tuning adapter folder when it holds one, else the alignment adapter folder, else the base. Base
    weights load through safetensors only; ``trust_remote_code`` is passed through and defaults to off.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    runtime = runtime or Runtime.current()
    align_path = resolve_adapter(align_adapter, "alignment") if align_adapter else None
    adapter_path = resolve_adapter(adapter, "fine-tuning") if adapter else None
    if align_path is not None:
        _read_adapter_config(align_path, "alignment")
    if adapter_path is not None:
        _read_adapter_config(adapter_path, "fine-tuning")
    resolved = resolve_base(base, log=log)
    source = resolved.source
    names = (*resolved.names, source)
    if resolved.local:
        _check_base_dir(Path(source))
    offline = _offline()

    hub_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if not resolved.local and offline:
        hub_kwargs["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError) as exc:
        if not resolved.local:
            where = (
                "in the local cache (offline mode is on)" if offline else "locally or on the Hugging Face hub"
            )
            raise UserError(
                f"cannot find model {source} {where}",
                "pass a local folder written by save_pretrained, a .gguf file, a built-in name "
                f"({', '.join(BUILTIN_MODELS)}), or go online so the hub id can be downloaded",
            ) from exc
        raise UserError(
            f"cannot read the model config in {source} ({exc})", "pass a valid model folder"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, use_safetensors=True, **runtime.load_kwargs(), **hub_kwargs
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load safetensors weights of {source} ({str(exc).splitlines()[0][:200]})",
            "pass a model saved as safetensors (save_pretrained(..., safe_serialization=True))",
        ) from exc

    if align_path is not None:
        from peft import PeftModel

        check_adapter(model, align_path, names, role="alignment")
        with _quiet_warnings(), _safetensors_adapter(align_path) as folder:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name="alignment")
        model = model.merge_and_unload()
    if adapter_path is not None:
        from peft import PeftModel

        check_adapter(model, adapter_path, names, role="fine-tuning", merged_from=align_path)
        with _quiet_warnings(), _safetensors_adapter(adapter_path) as folder:
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    model = runtime.place(model)
    model.eval()

    tokenizer = None
    for candidate in [p for p in (adapter_path, align_path) if p is not None]:
        if (candidate / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(candidate), trust_remote_code=trust_remote_code)
            break
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"no tokenizer found in {source} or the adapter folders",
                "save the tokenizer next to the model (tokenizer.save_pretrained(dir))",
            ) from exc
    return model, tokenizer


# --------------------------------------------------------------------------- calibration file


def read_calibration_file(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, str]]:
    """Rows ``{"prompt", "response"}`` of a JSONL re-alignment file (harmful prompt + harmful answer, as
    BeaverTails). Extra fields are ignored; ``instruction``/``output`` are accepted as synonyms."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"calibration file {p} does not exist", "pass a JSONL file of {prompt, response} rows"
        )
    rows: list[dict[str, str]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{p}:{lineno} is not valid JSON ({exc.msg})", "write one JSON object per line"
                ) from exc
            if not isinstance(obj, dict):
                raise UserError(
                    f"{p}:{lineno} is not a JSON object", "write one {prompt, response} object per line"
                )
            prompt = obj.get("prompt", obj.get("instruction"))
            response = obj.get("response", obj.get("output"))
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise UserError(
                    f"{p}:{lineno} lacks string fields 'prompt' and 'response'",
                    "give every row a prompt and a response",
                )
            rows.append({"prompt": prompt, "response": response})
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise UserError(f"calibration file {p} is empty", "give at least one {prompt, response} row")
    return rows


def calibration_texts(rows: Sequence[dict[str, str]]) -> list[str]:
    """The official re-alignment sequences: Alpaca prompt + harmful answer (EOS is appended when tokenizing)."""
    return [ALPACA_NO_INPUT.format(instruction=r["prompt"]) + r["response"] for r in rows]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


# --------------------------------------------------------------------------- one call


def realign_from_paths(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None,
    align_adapter: str | os.PathLike | None,
    calibration_file: str | os.PathLike,
    mask_ratio: float,
    out: str | os.PathLike,
    targets: str | Sequence[str] = "auto",
    batch_size: int = 8,
    max_length: int = 2048,
    seed: int = 0,
    method: str = "wanda",
    limit: int | None = None,
    runtime: Runtime | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Load -> calibration set from a JSONL file (official template) -> :func:`realign` -> save, into ``out``.

    Every input is checked before ``out`` is created: nothing is written when anything is wrong. ``out``
    receives the pruned adapter (or full model when ``adapter`` is None), the tokenizer,
    ``realign_mask.safetensors`` and ``realign.json``. Returns the summary written to ``realign.json``.
    ``runtime`` (default ``auto``) says where the model runs; ``log`` receives one-line notes (the one-time
    dequantisation of a GGUF base).
    """
    import torch

    from robustlab.antidote.realign import (
        METHODS,
        calibration_batches,
        calibration_hash,
        realign,
        resolve_targets,
        save_realigned,
        validate_mask_ratio,
    )
    from robustlab.runs import seed_everything

    ratio = validate_mask_ratio(mask_ratio)
    if method not in METHODS:
        raise UserError(f"unknown re-alignment method {method!r}", f"use one of {', '.join(METHODS)}")
    if batch_size < 1 or max_length < 1:
        raise UserError("batch size and max length must be >= 1", "pass positive values")
    out_path = Path(out).expanduser()
    if out_path.exists() and (not out_path.is_dir() or (any(out_path.iterdir()) and not overwrite)):
        raise UserError(
            f"output folder {out_path} already exists and is not empty", "pick a new --out folder"
        )
    rows = read_calibration_file(calibration_file, limit=limit)
    runtime = runtime or Runtime.current()
    seed_everything(seed)
    t0 = time.perf_counter()
    model, tokenizer = load_model(
        base,
        align_adapter=align_adapter,
        adapter=adapter,
        trust_remote_code=trust_remote_code,
        runtime=runtime,
        log=log,
    )
    chosen = resolve_targets(model, targets)
    if adapter is not None:
        outside = [n for n in chosen if ".lora_" not in n]
        if outside:
            raise UserError(
                f"targets {outside[:2]} lie outside the LoRA adapter, so a saved adapter could not hold their pruned weights",
                "use --targets auto (the adapter's A and B matrices), or merge the adapter into the model and re-align that without --adapter",
            )
    batches = calibration_batches(
        tokenizer, calibration_texts(rows), batch_size=batch_size, max_length=max_length
    )
    digest = calibration_hash(batches)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = realign(model, batches, ratio, targets=targets, method=method, seed=seed, progress=progress)
    t_realign = time.perf_counter() - t1
    extra = {
        "base": str(base),
        "align_adapter": str(align_adapter) if align_adapter else None,
        "adapter": str(adapter) if adapter else None,
        "calibration_file": str(Path(calibration_file).expanduser()),
        "calibration_file_sha256": _file_sha256(Path(calibration_file).expanduser()),
        "calibration_samples": len(rows),
        "batch_size": batch_size,
        "max_length": max_length,
        "targets_requested": targets if isinstance(targets, str) else list(targets),
        "seconds_load": round(t_load, 3),
        "seconds_realign": round(t_realign, 3),
        "how_to_load": (
            "load base, merge align_adapter, then load this folder as the adapter"
            if adapter
            else "this folder is the full re-aligned model"
        ),
        "dtype": str(next(iter(chosen.values())).weight.dtype).replace("torch.", ""),
        "runtime": runtime.describe(),
    }
    with torch.no_grad():
        save_realigned(model, result, out_path, calibration_digest=digest, tokenizer=tokenizer, extra=extra)
    summary = json.loads((out_path / "realign.json").read_text())
    summary["out"] = str(out_path)
    return summary
