"""Which weights Antidote re-aligns: the target modules of a model (``papers/antidote.md`` §1.2).

The official code prunes only the fine-tuning LoRA adapter's ``lora_A`` / ``lora_B`` matrices (on q/k/v), or
the full q/k/v weights after full fine-tuning. Here a target is any ``torch.nn.Linear`` or GPT-2 style
``Conv1D`` (weight stored transposed: its first axis is the input dimension), chosen by
:func:`resolve_targets`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

from torch import nn

from robustlab.errors import UserError

__all__ = [
    "TARGET_KEYWORDS",
    "has_lora_adapter",
    "input_dim",
    "is_prunable",
    "out_axis",
    "output_embedding_modules",
    "resolve_targets",
]

TARGET_KEYWORDS = ("auto", "lora", "all-linear")
_LORA_NAME = re.compile(r"(^|\.)lora_[AB]\.[^.]+$")

# --------------------------------------------------------------------------- module kinds


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency of the antidote extra
        return None
    return Conv1D


def is_prunable(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def input_dim(module: nn.Module) -> int:
    """The axis of ``module.weight`` that indexes input channels: 1 for ``nn.Linear``, 0 for ``Conv1D``."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return 0
    if isinstance(module, nn.Linear):
        return 1
    raise TypeError(f"{type(module).__name__} is neither torch.nn.Linear nor Conv1D")


def out_axis(module: nn.Module) -> int:
    return 1 - input_dim(module)


# --------------------------------------------------------------------------- targets


def has_lora_adapter(model: nn.Module) -> bool:
    """True when ``model`` carries peft LoRA matrices (``...lora_A.<adapter>`` / ``...lora_B.<adapter>``)."""
    return any(_LORA_NAME.search(name) and is_prunable(m) for name, m in model.named_modules())


def _active_adapters(model: nn.Module) -> set[str] | None:
    active = getattr(model, "active_adapters", None)
    if callable(active):  # older peft exposes a method on some classes
        with contextlib.suppress(Exception):
            active = active()
    if isinstance(active, str):
        return {active}
    if isinstance(active, (list, tuple, set)):
        return {str(a) for a in active}
    return None


def output_embedding_modules(model: nn.Module) -> set[int]:
    """ids of the output-embedding (lm_head) modules, which "all-linear" leaves out."""
    ids: set[int] = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        with contextlib.suppress(Exception):
            head = getter()
            if head is not None:
                ids.add(id(head))
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("lm_head", "embed_out", "output_projection") and is_prunable(module):
            ids.add(id(module))
    return ids


def resolve_targets(model: nn.Module, targets: str | Sequence[str] = "auto") -> dict[str, nn.Module]:
    """The modules whose weights re-alignment scores and prunes, by module name (``model.named_modules()``).

    ``targets``:

    - ``"auto"`` (default): ``"lora"`` when the model carries a peft LoRA adapter (the paper's setting),
      otherwise ``"all-linear"`` (full fine-tuning).
    - ``"lora"``: the LoRA A and B matrices of the active adapter(s) (``...lora_A.<name>``, ``...lora_B.<name>``).
    - ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` of the model except the output embedding (lm_head);
      embeddings are ``nn.Embedding`` and never included. Name ``lm_head`` explicitly to include it.
    - any other string: a regular expression searched in every module name (``re.search``), or, when it has
      no regex syntax, a module name / dotted suffix as in a list.
    - a list of strings: each entry is an exact module name, a dotted suffix of module names (``"q_proj"``
      selects every ``...q_proj``), or ``"re:<regex>"``.

    Only ``nn.Linear`` and ``Conv1D`` modules are returned. An entry that selects none raises
    :class:`UserError`, as does a model without any LoRA matrices under ``"lora"``.
    """
    named = dict(model.named_modules())
    prunable = {name: m for name, m in named.items() if name and is_prunable(m)}

    if isinstance(targets, str) and targets in TARGET_KEYWORDS:
        kind = targets
        if kind == "auto":
            kind = "lora" if has_lora_adapter(model) else "all-linear"
        if kind == "lora":
            active = _active_adapters(model)
            chosen = {
                n: m
                for n, m in prunable.items()
                if _LORA_NAME.search(n) and (active is None or n.rsplit(".", 1)[-1] in active)
            }
            if not chosen:
                raise UserError(
                    "targets='lora' but the model carries no LoRA adapter (no lora_A/lora_B modules)",
                    "pass --adapter with a peft LoRA adapter, or use targets 'all-linear' for a fully fine-tuned model",
                )
            return chosen
        heads = output_embedding_modules(model)
        chosen = {n: m for n, m in prunable.items() if id(m) not in heads}
        if not chosen:
            raise UserError("the model has no Linear or Conv1D layers to re-align", "check the model")
        return chosen

    if isinstance(targets, str):
        # a plain name such as "q_proj" is a name/suffix; anything with regex syntax is a regex
        entries: list[str] = [f"re:{targets}" if set(targets) & set("\\^$.*+?[](){}|") else targets]
    elif isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets):
        entries = list(targets)
    else:
        raise UserError(
            f"targets must be 'auto', 'lora', 'all-linear', a regex or a non-empty list of module names, got {targets!r}",
            "pass e.g. targets=['q_proj', 'v_proj'] or targets='all-linear'",
        )

    chosen: dict[str, nn.Module] = {}
    for entry in entries:
        if entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as exc:
                raise UserError(
                    f"target regex {entry[3:]!r} is invalid ({exc})", "fix the regular expression"
                ) from exc
            hits = {n: m for n, m in prunable.items() if pattern.search(n)}
        else:
            hits = {n: m for n, m in prunable.items() if n == entry or n.endswith("." + entry)}
        if not hits:
            example = ", ".join([n for n in prunable if not n.endswith(".base_layer")][:4])
            raise UserError(
                f"target {entry!r} matches no Linear/Conv1D module of the model",
                f"use module names from model.named_modules() (e.g. {example}), a suffix such as 'q_proj', or 'all-linear'",
            )
        chosen.update(hits)
    return dict(sorted(chosen.items(), key=lambda kv: list(prunable).index(kv[0])))
