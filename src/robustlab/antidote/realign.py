"""Antidote's re-alignment step: one-shot Wanda pruning of the weights a harmful calibration set activates.

The method, as the official code does it (``git-disl/Antidote`` ``utils.py`` ``prune_wanda_outlier`` and
``WrappedGPT.add_batch``; see ``papers/antidote.md`` section 1):

1. Run the *unpruned* fine-tuned model over the re-alignment (calibration) set with forward hooks on the
   target modules. For every input channel ``j`` of a target, accumulate ``x_j^2`` over the calibration
   tokens.
2. Score every weight with Wanda: ``S_ij = |W_ij| * sqrt(mean x_j^2)``.
3. In every output unit's row, mark the top ``mask_ratio`` (α) fraction of scores as "harmful" and zero them.
   The official code sorts each row ascending and keeps the lowest ``int(cols * (1 - α))`` entries, so a
   row of ``cols`` entries loses exactly ``cols - int(cols * (1 - α))``; :func:`zeroed_per_row` is that
   count and this module reproduces it exactly.

Differences from the official code, all of which leave the masks unchanged:

- The official statistic is ``(1/N_samples) Σ_samples Σ_tokens x_j^2``; here it is the mean over all
  non-padded calibration tokens, ``(1/N_tokens) Σ_samples Σ_tokens x_j^2``. The two differ by the constant
  factor ``N_tokens / N_samples`` for every channel of every module, so every per-row ranking, and hence
  every mask, is the same; the token mean is the one that batching cannot change.
- The official code calibrates with batch size 1 and replays the decoder layer by layer. Here one forward
  pass over padded batches collects every module's statistics at once; padded positions are excluded
  token by token (and left padding gets explicit ``position_ids``), so any batch size gives the statistics
  of batch size 1. Sums are accumulated in float64.
- Targets are any ``torch.nn.Linear`` or GPT-2 style ``Conv1D`` (weight stored transposed: its first axis is
  the input dimension, so an output unit's "row" is a column of the stored weight).

The controls of the paper are ``method="magnitude"`` (scores ``|W|``, the official fallback without
calibration data) and ``method="random"`` (seeded uniform scores, i.e. a uniformly random set of exactly
the same per-row size).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import UserError

__all__ = [
    "METHODS",
    "RealignResult",
    "WandaScores",
    "apply_masks",
    "calibration_batches",
    "calibration_hash",
    "has_lora_adapter",
    "input_dim",
    "magnitude_scores",
    "masks_for_ratios",
    "masks_from_scores",
    "random_scores",
    "realign",
    "resolve_targets",
    "save_realigned",
    "validate_mask_ratio",
    "wanda_scores",
    "zeroed_per_row",
]

METHODS = ("wanda", "magnitude", "random")
TARGET_KEYWORDS = ("auto", "lora", "all-linear")
_LORA_NAME = re.compile(r"(^|\.)lora_[AB]\.[^.]+$")


# --------------------------------------------------------------------------- module kinds


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency of the antidote extra
        return None
    return Conv1D


def _is_prunable(module: nn.Module) -> bool:
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


def _out_axis(module: nn.Module) -> int:
    return 1 - input_dim(module)


# --------------------------------------------------------------------------- targets


def has_lora_adapter(model: nn.Module) -> bool:
    """True when ``model`` carries peft LoRA matrices (``...lora_A.<adapter>`` / ``...lora_B.<adapter>``)."""
    return any(_LORA_NAME.search(name) and _is_prunable(m) for name, m in model.named_modules())


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


def _output_embedding_modules(model: nn.Module) -> set[int]:
    """ids of the output-embedding (lm_head) modules, which "all-linear" leaves out."""
    ids: set[int] = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        with contextlib.suppress(Exception):
            head = getter()
            if head is not None:
                ids.add(id(head))
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("lm_head", "embed_out", "output_projection") and _is_prunable(module):
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
    prunable = {name: m for name, m in named.items() if name and _is_prunable(m)}

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
        heads = _output_embedding_modules(model)
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


# --------------------------------------------------------------------------- calibration data


def calibration_batches(
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int = 2048,
    sort_by_length: bool = True,
    add_eos: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``texts`` into padded batches ``{"input_ids", "attention_mask"}`` (LongTensors).

    Each text is truncated to ``max_length`` tokens; with ``add_eos`` the tokenizer's EOS is appended when
    the tokenizer did not add it (the official re-alignment samples end in EOS). Padding follows
    ``tokenizer.padding_side``; the pad id is ``pad_token_id``, else ``eos_token_id``, else 0 (padded
    positions are never looked at). ``sort_by_length`` groups texts of similar length to waste little compute
    on padding; the Wanda statistics are sums over tokens, so the order does not change them.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}", "pass a positive batch size")
    if max_length < 1:
        raise UserError(f"max length must be >= 1, got {max_length}", "pass a positive max length")
    texts = list(texts)
    if not texts:
        raise UserError("the calibration set is empty", "give at least one calibration text")
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos if eos is not None else 0
    seqs: list[list[int]] = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        seqs.append(ids[:max_length])
    if any(len(s) == 0 for s in seqs):
        raise UserError(
            "a calibration text tokenizes to zero tokens", "drop empty texts from the calibration set"
        )
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if sort_by_length else list(range(len(seqs)))
    left = getattr(tokenizer, "padding_side", "right") == "left"
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[start : start + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[row, sl] = torch.tensor(s, dtype=torch.long)
            mask[row, sl] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _batch_tensors(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise UserError(
            "each calibration batch must be a mapping with 'input_ids' (and 'attention_mask')",
            "build batches with robustlab.antidote.realign.calibration_batches",
        )
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise UserError(
            f"attention_mask shape {tuple(mask.shape)} differs from input_ids shape {tuple(ids.shape)}",
            "give one mask entry per token",
        )
    return ids.long(), mask.long()


def calibration_hash(calibration: Iterable[Any]) -> str:
    """sha256 of the calibration set's non-padded token sequences, as a multiset.

    Batching, padding side and order do not change it (neither do they change the Wanda statistics), so it
    identifies the calibration data a mask was computed from. Returns ``"sha256:<hex>"``.
    """
    digests = []
    for batch in calibration:
        ids, mask = _batch_tensors(batch)
        for row in range(ids.shape[0]):
            seq = ids[row][mask[row].bool()].to(torch.int64).cpu().numpy().tobytes()
            digests.append(hashlib.sha256(seq).hexdigest())
    total = hashlib.sha256()
    for d in sorted(digests):
        total.update(d.encode())
    return f"sha256:{total.hexdigest()}"


# --------------------------------------------------------------------------- scores


class WandaScores(dict):
    """Scores by module name (tensors of each weight's shape) plus ``out_axis[name]``: the weight axis that
    indexes output units (0 for ``nn.Linear``, 1 for ``Conv1D``). ``stats`` holds the per-input-channel mean
    of ``x^2`` and ``tokens`` the number of calibration tokens per module (empty for the controls)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_axis: dict[str, int] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}


def _forward_kwargs(model: nn.Module) -> set[str]:
    """Keyword arguments the underlying transformers model's ``forward`` takes (peft wrappers pass them on)."""
    base: Any = model
    getter = getattr(model, "get_base_model", None)
    if callable(getter):
        with contextlib.suppress(Exception):
            base = getter()
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


class _Collector:
    """Forward hooks that add up ``x_j^2`` over non-padded tokens; they only read the inputs."""

    def __init__(self, targets: Mapping[str, nn.Module]) -> None:
        self.targets = targets
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = dict.fromkeys(targets, 0)
        self.mask: torch.Tensor | None = None  # (batch, seq) bool of the batch in flight
        self.flat_index: torch.Tensor | None = None
        self.handles: list[Any] = []

    def set_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self.flat_index = self.mask.reshape(-1).nonzero().squeeze(1)

    def hook(self, name: str, dim: int):
        def collect(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            assert self.mask is not None and self.flat_index is not None
            if x.shape[-1] != dim:
                raise RuntimeError(f"{name}: input has {x.shape[-1]} features, weight expects {dim}")
            rows = x.reshape(-1, dim)
            # (batch, seq, dim) inputs flatten row-major, so the flat token index of the mask applies
            if rows.shape[0] != self.mask.numel():
                raise UserError(
                    f"module {name} sees {rows.shape[0]} input rows for a batch of {self.mask.numel()} tokens, "
                    "so its inputs cannot be matched to calibration tokens",
                    "leave it out of the targets (e.g. mixture-of-experts expert layers)",
                )
            valid = rows.index_select(0, self.flat_index.to(x.device))
            if valid.dtype != torch.float64:
                valid = valid.float()
            sq = valid.square().sum(dim=0, dtype=torch.float64)
            if name in self.sums:
                self.sums[name] += sq
            else:
                self.sums[name] = sq
            self.tokens[name] += int(self.flat_index.numel())

        return collect

    def __enter__(self) -> _Collector:
        for name, module in self.targets.items():
            dim = module.weight.shape[input_dim(module)]
            self.handles.append(module.register_forward_pre_hook(self.hook(name, dim), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def wanda_scores(
    model: nn.Module,
    calibration: Iterable[Any],
    targets: str | Sequence[str] = "auto",
    progress: bool = False,
) -> WandaScores:
    """Wanda scores ``|W_ij| * sqrt(mean over calibration tokens of x_j^2)`` for every target module.

    ``calibration`` is an iterable of batches, each a mapping with ``input_ids`` and ``attention_mask``
    (1 = real token, 0 = padding; left or right padding). Padded positions are excluded token by token,
    and with left padding the positions of real tokens are passed as ``position_ids`` (the mask's cumulative
    sum), so every batch size gives the statistics of batch size 1. Statistics come from one forward pass of
    the unpruned model per batch (``model.eval()``, no gradients); hooks only read module inputs. Returns a
    :class:`WandaScores` (float32 scores of each weight's shape, on the weight's device).

    Raises :class:`UserError` for an empty calibration set or malformed batches.
    """
    chosen = resolve_targets(model, targets)
    device = _model_device(model)
    accepted = _forward_kwargs(model)
    heads = _output_embedding_modules(model)
    skip_logits = "logits_to_keep" in accepted and not any(id(m) in heads for m in chosen.values())
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with _Collector(chosen) as collector, torch.no_grad():
            iterator: Iterable[Any] = calibration
            if progress:
                from robustlab.runs import track

                iterator = track(calibration, "Wanda calibration")
            for batch in iterator:
                ids, mask = _batch_tensors(batch)
                if int(mask.sum()) == 0:
                    continue
                ids, mask = ids.to(device), mask.to(device)
                kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
                if "position_ids" in accepted:
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                if "use_cache" in accepted:
                    kwargs["use_cache"] = False
                if skip_logits:
                    kwargs["logits_to_keep"] = 1
                collector.set_batch(mask)
                model(**kwargs)
                seen += int(mask.sum())
    finally:
        model.train(was_training)
    if seen == 0:
        raise UserError(
            "the calibration set is empty (no non-padded tokens)", "give at least one calibration text"
        )

    scores = WandaScores()
    for name, module in chosen.items():
        tokens = collector.tokens[name]
        if tokens == 0 or name not in collector.sums:
            raise UserError(
                f"target module {name} was never called during calibration",
                "leave it out of the targets (it does not take part in the forward pass)",
            )
        mean_sq = collector.sums[name] / tokens
        # float32 scores (float64 for a float64 model, so that nothing is lost to rounding there)
        dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
        norm = mean_sq.sqrt().to(device=module.weight.device, dtype=dtype)
        in_axis = input_dim(module)
        shape = [1, 1]
        shape[in_axis] = -1
        scores[name] = module.weight.detach().abs().to(dtype) * norm.view(shape)
        scores.out_axis[name] = 1 - in_axis
        scores.stats[name] = mean_sq
        scores.tokens[name] = tokens
    return scores


def magnitude_scores(model: nn.Module, targets: str | Sequence[str] = "auto") -> WandaScores:
    """The magnitude control: ``|W|`` (the official fallback when no calibration sample is given)."""
    scores = WandaScores()
    for name, module in resolve_targets(model, targets).items():
        scores[name] = module.weight.detach().abs().float()
        scores.out_axis[name] = _out_axis(module)
    return scores


def random_scores(model: nn.Module, targets: str | Sequence[str] = "auto", seed: int = 0) -> WandaScores:
    """The random-pruning control: i.i.d. uniform scores from one seeded generator (modules in name order),
    so the mask is a uniformly random set of exactly the same per-row size as Antidote's."""
    gen = torch.Generator().manual_seed(int(seed))
    scores = WandaScores()
    for name, module in sorted(resolve_targets(model, targets).items()):
        scores[name] = torch.rand(module.weight.shape, generator=gen).to(module.weight.device)
        scores.out_axis[name] = _out_axis(module)
    return scores


# --------------------------------------------------------------------------- masks


def validate_mask_ratio(mask_ratio: float) -> float:
    """Return ``mask_ratio`` as a float; :class:`UserError` unless ``0 < mask_ratio < 1``."""
    try:
        value = float(mask_ratio)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"mask ratio must be a number, got {mask_ratio!r}", "pass e.g. --mask-ratio 0.05"
        ) from exc
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise UserError(
            f"mask ratio must lie strictly between 0 and 1, got {mask_ratio}",
            "pass the fraction of each row to zero, e.g. --mask-ratio 0.05 (the paper uses 0.01-0.2)",
        )
    return value


def zeroed_per_row(cols: int, mask_ratio: float) -> int:
    """How many of a row's ``cols`` entries are zeroed: ``cols - int(cols * (1 - α))``, as the official code
    (which keeps the ``int(cols * (1 - α))`` lowest scores of each row)."""
    return int(cols - int(cols * (1.0 - mask_ratio)))


def _row_major(score: torch.Tensor, out_axis: int) -> torch.Tensor:
    if score.dim() != 2:
        raise ValueError(f"scores must be 2-D weight matrices, got shape {tuple(score.shape)}")
    return score if out_axis == 0 else score.t()


def masks_for_ratios(
    scores: Mapping[str, torch.Tensor],
    mask_ratios: Sequence[float],
    out_axis: Mapping[str, int] | None = None,
) -> dict[float, dict[str, torch.Tensor]]:
    """Masks for several ratios from one score computation, sorting each row once.

    Returns ``{ratio: {module name: bool mask of the weight's shape, True = zeroed}}``. The masks are nested:
    a larger ratio zeroes a superset of a smaller one's entries.
    """
    ratios = [validate_mask_ratio(r) for r in mask_ratios]
    axes = dict(getattr(scores, "out_axis", {}) or {})
    axes.update(out_axis or {})
    result: dict[float, dict[str, torch.Tensor]] = {r: {} for r in ratios}
    for name, score in scores.items():
        axis = axes.get(name, 0)
        rows = _row_major(score, axis)
        cols = rows.shape[1]
        # descending, stable: position p in a row holds the p-th highest score
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices
        for r in ratios:
            k = zeroed_per_row(cols, r)
            mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
            if k > 0:
                mask.scatter_(1, order[:, :k], True)
            result[r][name] = mask if axis == 0 else mask.t()
    return result


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    mask_ratio: float,
    out_axis: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Per output-unit row, mark the top ``mask_ratio`` fraction of scores (exactly
    :func:`zeroed_per_row` entries per row). Returns bool masks of each weight's shape, True = zeroed.

    The output axis comes from ``scores.out_axis`` (a :class:`WandaScores`) or ``out_axis``; a plain dict is
    taken to hold ``nn.Linear`` weights (rows = output units).
    """
    return masks_for_ratios(scores, [mask_ratio], out_axis)[validate_mask_ratio(mask_ratio)]


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Zero, in place, the weight entries where ``masks[name]`` is True; returns the zeroed count per module."""
    named = dict(model.named_modules())
    counts: dict[str, int] = {}
    with torch.no_grad():
        for name, mask in masks.items():
            module = named.get(name)
            if module is None or not hasattr(module, "weight"):
                raise UserError(
                    f"mask for {name!r} but the model has no such module",
                    "apply masks to the model they were computed on",
                )
            if tuple(mask.shape) != tuple(module.weight.shape):
                raise UserError(
                    f"mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(module.weight.shape)}",
                    "apply masks to the model they were computed on",
                )
            m = mask.to(device=module.weight.device, dtype=torch.bool)
            module.weight.masked_fill_(m, 0)
            counts[name] = int(m.sum())
    return counts


# --------------------------------------------------------------------------- realign


@dataclass
class RealignResult:
    """What :func:`realign` did. ``masks`` maps module name -> bool tensor of the weight's shape
    (True = zeroed); ``counts`` the zeroed entries per module; ``sizes`` each weight's entry count."""

    masks: dict[str, torch.Tensor]
    counts: dict[str, int]
    sizes: dict[str, int]
    mask_ratio: float
    method: str
    targets: list[str] = field(default_factory=list)
    calibration_tokens: int = 0
    seed: int = 0

    @property
    def total_zeroed(self) -> int:
        return sum(self.counts.values())

    @property
    def total_params(self) -> int:
        return sum(self.sizes.values())

    def summary(self) -> dict[str, Any]:
        return {
            "mask_ratio": self.mask_ratio,
            "method": self.method,
            "seed": self.seed,
            "modules": len(self.masks),
            "zeroed": self.total_zeroed,
            "params": self.total_params,
            "zeroed_fraction": self.total_zeroed / max(1, self.total_params),
            "calibration_tokens": self.calibration_tokens,
        }


def realign(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    mask_ratio: float,
    targets: str | Sequence[str] = "auto",
    method: str = "wanda",
    seed: int = 0,
    scores: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> RealignResult:
    """Antidote: score the target weights, zero the top ``mask_ratio`` of every output row, in place.

    ``method``: ``"wanda"`` (Antidote; needs ``calibration`` unless ``scores`` are given), ``"magnitude"``
    (|W|) or ``"random"`` (seeded). Pass precomputed ``scores`` (from :func:`wanda_scores` on the *unpruned*
    model) to derive several ratios from one calibration pass, each on a fresh copy of the weights.
    """
    ratio = validate_mask_ratio(mask_ratio)
    if method not in METHODS:
        raise UserError(f"unknown re-alignment method {method!r}", f"use one of {', '.join(METHODS)}")
    chosen = resolve_targets(model, targets)
    tokens = 0
    if scores is None:
        if method == "wanda":
            if calibration is None:
                raise UserError("Wanda scoring needs a calibration set", "pass calibration batches")
            scores = wanda_scores(model, calibration, targets)
            tokens = sum(getattr(scores, "tokens", {}).values()) // max(1, len(scores))
        elif method == "magnitude":
            scores = magnitude_scores(model, targets)
        else:
            scores = random_scores(model, targets, seed)
    else:
        missing = sorted(set(chosen) - set(scores))
        if missing:
            raise UserError(
                f"scores lack target modules {missing[:3]}", "compute scores with the same targets"
            )
        given = WandaScores({n: scores[n] for n in chosen})
        given.out_axis = {n: _out_axis(m) for n, m in chosen.items()}
        scores = given
    masks = masks_from_scores(scores, ratio)
    counts = apply_masks(model, masks)
    return RealignResult(
        masks=masks,
        counts=counts,
        sizes={n: int(m.weight.numel()) for n, m in chosen.items()},
        mask_ratio=ratio,
        method=method,
        targets=list(chosen),
        calibration_tokens=tokens,
        seed=seed,
    )


# --------------------------------------------------------------------------- saving


def _versions() -> dict[str, str | None]:
    from robustlab.runs import package_versions

    return package_versions(("robustlab", "torch", "transformers", "peft", "safetensors"))


def save_realigned(
    model: nn.Module,
    result: RealignResult,
    out_dir: str | Path,
    calibration_digest: str | None = None,
    tokenizer: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the re-aligned model to ``out_dir``.

    - ``save_pretrained`` of the model: for a peft model, the (pruned) adapter only (base and merged alignment
      adapter are untouched by LoRA re-alignment); otherwise the full weights, as safetensors.
    - ``realign_mask.safetensors``: the bool masks by module name (True = zeroed).
    - ``realign.json``: ratio, method, counts and sizes per module, calibration hash, package versions.
    """
    from safetensors.torch import save_file

    from robustlab.runs import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _accepts(model.save_pretrained, "safe_serialization"):
        model.save_pretrained(str(out), safe_serialization=True)
    else:  # transformers 5 always writes safetensors and dropped the flag
        model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    save_file(
        {n: m.detach().to("cpu", torch.bool).contiguous() for n, m in result.masks.items()},
        str(out / "realign_mask.safetensors"),
    )
    record: dict[str, Any] = {
        **result.summary(),
        "calibration_hash": calibration_digest,
        "counts": result.counts,
        "sizes": result.sizes,
        "targets": result.targets,
        "saved": "adapter" if has_lora_adapter(model) and hasattr(model, "peft_config") else "model",
        "versions": _versions(),
    }
    if extra:
        record.update(dict(extra))
    atomic_write_json(out / "realign.json", record)
    return out


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``realign_mask.safetensors`` (a file or the folder holding it)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "realign_mask.safetensors"
    if not p.is_file():
        raise UserError(f"no mask file at {p}", "point at a folder written by save_realigned")
    return {k: v.bool() for k, v in load_file(str(p)).items()}
