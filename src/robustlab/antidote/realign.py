"""Antidote's re-alignment step: one-shot Wanda pruning of the weights a harmful calibration set activates.

The method, as the official code does it (``git-disl/Antidote`` ``utils.py`` ``prune_wanda_outlier`` and
``WrappedGPT.add_batch``; ``papers/antidote.md`` §1):

1. Run the *unpruned* fine-tuned model over the re-alignment (calibration) set with forward hooks on the
   target modules and accumulate ``x_j^2`` per input channel (:func:`~robustlab.antidote.calibration.
   collect_statistics`).
2. Score every weight with Wanda: ``S_ij = |W_ij| * sqrt(mean x_j^2)`` (:func:`module_score`).
3. In every output unit's row, zero the top ``mask_ratio`` (α) fraction of scores (:func:`row_masks`).

This module is the only place where weights are scored and masks are built; the CLI, the pipeline, the
sweep, the baselines and the tiny demo all call :func:`realign` or :func:`realign_masks`.

**Tie-breaking, as the official code.** Each row is sorted *ascending* with a stable sort and its first
``int(cols * (1 - α))`` entries are kept, the rest zeroed; so a row loses exactly :func:`zeroed_per_row`
entries, and among equal scores the entries with the *lower* column index are kept (the later ones are
zeroed). Given the same score tensor, the masks are exactly the official ones. The scores themselves are the
official ones up to one positive factor per module (token mean instead of sample mean, see
:mod:`robustlab.antidote.calibration`) and float rounding (float64 sums here, a float32 running mean
there), so a mask can differ from the official code's only where two scores of a row are within rounding
of each other.

**Memory.** Statistics are one float64 vector per module. Scores are built one module at a time, right
after the calibration pass has made all statistics final, turned into bool masks (kept on the CPU) and
dropped before the next module is scored, so the float32 scores of all targets never coexist. Undoing a
pruning (:class:`Pruned`) keeps only the values the masks zeroed, never a copy of the model.

The paper's controls are ``method="magnitude"`` (scores ``|W|``, the official fallback without calibration
data) and ``method="random"`` (seeded uniform scores: a uniformly random set of exactly the same per-row
size).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.antidote.calibration import (
    calibration_batches,
    calibration_hash,
    collect_statistics,
)
from robustlab.antidote.targets import has_lora_adapter, input_dim, out_axis, resolve_targets
from robustlab.errors import UserError

__all__ = [
    "METHODS",
    "Pruned",
    "RatioMasks",
    "RealignResult",
    "WandaScores",
    "apply_masks",
    "calibration_batches",
    "calibration_hash",
    "has_lora_adapter",
    "load_masks",
    "masks_for_ratios",
    "masks_from_scores",
    "module_score",
    "realign",
    "realign_masks",
    "resolve_targets",
    "row_masks",
    "save_realigned",
    "validate_mask_ratio",
    "wanda_scores",
    "zeroed_per_row",
]

METHODS = ("wanda", "magnitude", "random")


# --------------------------------------------------------------------------- scores


def module_score(
    module: nn.Module,
    method: str = "wanda",
    mean_sq: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One module's scores, in the shape of its stored weight: Wanda ``|W| * sqrt(mean_sq)`` along the input
    axis, ``|W|`` (magnitude) or uniform noise from ``generator`` (random). Float32 (float64 for a float64
    weight, so nothing is lost to rounding there), on the weight's device."""
    weight = module.weight.detach()
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if method == "random":
        return torch.rand(weight.shape, generator=generator).to(device=weight.device, dtype=dtype)
    score = weight.abs().to(dtype)
    if method == "magnitude":
        return score
    if mean_sq is None:
        raise ValueError("Wanda scores need the calibration statistic mean_sq")
    shape = [1, 1]
    shape[input_dim(module)] = -1
    return score.mul_(mean_sq.sqrt().to(device=weight.device, dtype=dtype).view(shape))


class WandaScores(dict):
    """Scores of every target by module name (tensors of each weight's shape) plus ``out_axis[name]``: the
    weight axis that indexes output units (0 for ``nn.Linear``, 1 for ``Conv1D``). ``stats`` holds the
    per-input-channel mean of ``x^2`` and ``tokens`` the calibration tokens per module. :func:`realign`
    never holds all scores at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_axis: dict[str, int] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}


def wanda_scores(
    model: nn.Module,
    calibration: Iterable[Any],
    targets: str | Sequence[str] = "auto",
    progress: bool = False,
) -> WandaScores:
    """Wanda scores ``|W_ij| * sqrt(mean over calibration tokens of x_j^2)`` of every target module at once
    (see :func:`~robustlab.antidote.calibration.collect_statistics` for the batches), for inspection and
    benchmarks. Returns a :class:`WandaScores`. Raises :class:`UserError` for an empty calibration set or
    malformed batches."""
    chosen = resolve_targets(model, targets)
    stats = collect_statistics(model, calibration, chosen, progress)
    scores = WandaScores()
    for name, module in chosen.items():
        scores[name] = module_score(module, "wanda", stats.mean_sq[name])
        scores.out_axis[name] = out_axis(module)
        scores.stats[name] = stats.mean_sq[name]
        scores.tokens[name] = stats.tokens[name]
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


def row_masks(
    score: torch.Tensor,
    axis: int,
    mask_ratios: Sequence[float],
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Bool masks (True = zeroed) of ``score``'s shape, one per ratio, from one sort per row.

    Rows are output units (``axis`` is the weight axis that indexes them). Each row is sorted ascending with
    a stable sort and its first ``int(cols * (1 - α))`` entries are kept, as the official code: among equal
    scores the lower column index is kept. The masks of several ratios are nested. ``out``: bool tensors of
    the row-major shape (output units first) to write the masks into, one per ratio (any device).
    """
    if score.dim() != 2:
        raise ValueError(f"scores must be 2-D weight matrices, got shape {tuple(score.shape)}")
    rows = score if axis == 0 else score.t()
    cols = rows.shape[1]
    order = torch.sort(rows, dim=1, stable=True).indices  # ascending; equal scores keep index order
    masks = []
    for i, ratio in enumerate(mask_ratios):
        keep = cols - zeroed_per_row(cols, ratio)
        target = out[i] if out is not None else None
        if target is not None and target.device == rows.device:
            mask = target.fill_(True)
        else:
            mask = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
        mask.scatter_(1, order[:, :keep], False)
        if target is not None and mask is not target:
            mask = target.copy_(mask)
        masks.append(mask if axis == 0 else mask.t())
    return masks


def masks_for_ratios(
    scores: Mapping[str, torch.Tensor],
    mask_ratios: Sequence[float],
    out_axis: Mapping[str, int] | None = None,
) -> dict[float, dict[str, torch.Tensor]]:
    """Masks for several ratios from precomputed scores (:func:`row_masks` per module).

    Returns ``{ratio: {module name: bool mask of the weight's shape, True = zeroed}}``. The output axis comes
    from ``scores.out_axis`` (a :class:`WandaScores`) or ``out_axis``; a plain dict is taken to hold
    ``nn.Linear`` weights (rows = output units).
    """
    ratios = [validate_mask_ratio(r) for r in mask_ratios]
    axes = dict(getattr(scores, "out_axis", {}) or {})
    axes.update(out_axis or {})
    result: dict[float, dict[str, torch.Tensor]] = {r: {} for r in ratios}
    for name, score in scores.items():
        for r, mask in zip(ratios, row_masks(score, axes.get(name, 0), ratios), strict=True):
            result[r][name] = mask
    return result


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    mask_ratio: float,
    out_axis: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`masks_for_ratios` for one ratio."""
    return masks_for_ratios(scores, [mask_ratio], out_axis)[validate_mask_ratio(mask_ratio)]


@dataclass
class Pruned:
    """What :func:`apply_masks` zeroed: ``counts`` per module and, when asked to remember, ``original``:
    the values the masks zeroed (flattened in mask order), enough for :meth:`restore` to undo it."""

    counts: dict[str, int]
    original: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def restore(self, model: nn.Module) -> None:
        """Put the zeroed values back (the weights are then exactly as before :func:`apply_masks`)."""
        if self.masks and not self.original:
            raise ValueError("apply_masks was called without remember=True; nothing to restore")
        named = dict(model.named_modules())
        with torch.no_grad():
            for name, mask in self.masks.items():
                weight = named[name].weight
                weight.masked_scatter_(mask.to(weight.device), self.original[name].to(weight.device))


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], remember: bool = False) -> Pruned:
    """Zero, in place, the weight entries where ``masks[name]`` is True. With ``remember`` the zeroed values
    are kept (only those, on the CPU) so that :meth:`Pruned.restore` can undo it."""
    named = dict(model.named_modules())
    pruned = Pruned(counts={}, masks=masks if remember else {})
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
            if remember:
                pruned.original[name] = module.weight.detach()[m].cpu()
            module.weight.masked_fill_(m, 0)
            pruned.counts[name] = int(m.sum())
    return pruned


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


@dataclass
class RatioMasks:
    """Masks of several ratios from one scoring: ``masks[ratio][module name]`` (bool, on the CPU)."""

    masks: dict[float, dict[str, torch.Tensor]]
    sizes: dict[str, int]
    method: str
    calibration_tokens: int = 0
    seed: int = 0

    def result(self, ratio: float, counts: Mapping[str, int] | None = None) -> RealignResult:
        """The :class:`RealignResult` of one ratio (``counts``: what applying it zeroed; default: the mask
        sizes, which is the same on weights without exact zeros)."""
        masks = self.masks[ratio]
        return RealignResult(
            masks=masks,
            counts=dict(counts) if counts is not None else {n: int(m.sum()) for n, m in masks.items()},
            sizes=dict(self.sizes),
            mask_ratio=ratio,
            method=self.method,
            targets=list(masks),
            calibration_tokens=self.calibration_tokens,
            seed=self.seed,
        )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"unknown re-alignment method {method!r}", f"use one of {', '.join(METHODS)}")


def realign_masks(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    mask_ratios: Sequence[float],
    targets: str | Sequence[str] = "auto",
    method: str = "wanda",
    seed: int = 0,
    progress: bool = False,
    runtime: Any = None,
) -> RatioMasks:
    """Antidote's masks for several ratios from one calibration pass, without changing the model.

    ``method``: ``"wanda"`` (Antidote; needs ``calibration``), ``"magnitude"`` (|W|) or ``"random"``
    (seeded). Modules are scored one at a time, in name order, once the calibration pass has made every
    statistic final; each score tensor is freed before the next is built. ``runtime``: anything with a
    ``.device`` (where the calibration batches go); default: the device of the model's first parameter.
    """
    ratios = [validate_mask_ratio(r) for r in mask_ratios]
    _check_method(method)
    chosen = resolve_targets(model, targets)
    stats = None
    if method == "wanda":
        if calibration is None:
            raise UserError("Wanda scoring needs a calibration set", "pass calibration batches")
        stats = collect_statistics(model, calibration, chosen, progress, getattr(runtime, "device", None))
    gen = torch.Generator().manual_seed(int(seed)) if method == "random" else None
    # every mask is a view of one CPU buffer: allocated once, so the long-lived masks do not interleave
    # with the per-module temporaries (which would fragment the heap and grow the resident set)
    total = sum(m.weight.numel() for m in chosen.values())
    buffer = torch.empty(len(ratios) * total, dtype=torch.bool)
    offsets, start = {}, 0
    for name, module in chosen.items():
        offsets[name] = start
        start += module.weight.numel()
    masks: dict[float, dict[str, torch.Tensor]] = {r: {} for r in ratios}
    for name, module in sorted(chosen.items()):
        shape = module.weight.shape if out_axis(module) == 0 else module.weight.shape[::-1]
        n = module.weight.numel()
        out = [buffer[i * total + offsets[name] :][:n].view(shape) for i in range(len(ratios))]
        score = module_score(module, method, stats.mean_sq[name] if stats else None, gen)
        for r, mask in zip(ratios, row_masks(score, out_axis(module), ratios, out), strict=True):
            masks[r][name] = mask
        del score
    return RatioMasks(
        masks={r: {n: m[n] for n in chosen} for r, m in masks.items()},  # model order
        sizes={n: int(m.weight.numel()) for n, m in chosen.items()},
        method=method,
        calibration_tokens=stats.calibration_tokens if stats else 0,
        seed=seed,
    )


def realign(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    mask_ratio: float,
    targets: str | Sequence[str] = "auto",
    method: str = "wanda",
    seed: int = 0,
    scores: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
    runtime: Any = None,
) -> RealignResult:
    """Antidote: score the target weights, zero the top ``mask_ratio`` of every output row, in place.

    ``method``: ``"wanda"`` (Antidote; needs ``calibration`` unless ``scores`` are given), ``"magnitude"``
    (|W|) or ``"random"`` (seeded). ``scores``: precomputed scores of the *unpruned* model (e.g. from
    :func:`wanda_scores`) instead of a calibration pass. ``runtime``: see :func:`realign_masks`.
    """
    ratio = validate_mask_ratio(mask_ratio)
    _check_method(method)
    if scores is None:
        found = realign_masks(model, calibration, [ratio], targets, method, seed, progress, runtime)
    else:
        chosen = resolve_targets(model, targets)
        missing = sorted(set(chosen) - set(scores))
        if missing:
            raise UserError(
                f"scores lack target modules {missing[:3]}", "compute scores with the same targets"
            )
        axes = {n: out_axis(m) for n, m in chosen.items()}
        found = RatioMasks(
            masks_for_ratios({n: scores[n] for n in chosen}, [ratio], axes),
            {n: int(m.weight.numel()) for n, m in chosen.items()},
            method,
            seed=seed,
        )
    pruned = apply_masks(model, found.masks[ratio])
    return found.result(ratio, pruned.counts)


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
        # clones: the masks are views of one buffer, and safetensors stores no shared memory
        {
            n: m.detach().to("cpu", torch.bool).clone(memory_format=torch.contiguous_format)
            for n, m in result.masks.items()
        },
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
