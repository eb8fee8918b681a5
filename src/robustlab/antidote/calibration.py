"""The re-alignment (calibration) set and the statistic Wanda needs from it (``papers/antidote.md`` §1.1, §1.4).

Antidote's calibration pass runs the *unpruned* fine-tuned model over harmful prompt + answer sequences and,
for every input channel ``j`` of every target module, accumulates ``x_j^2``. The official code
(``WrappedGPT.add_batch``) keeps the running mean over samples of the per-sample sum over tokens; here the
statistic is the mean over all non-padded tokens, ``(1/N_tokens) Σ_samples Σ_tokens x_j^2``. The two differ
by the factor ``N_tokens / N_samples``, the same for every channel of every module, so every per-row ranking
(hence every mask) is the same in exact arithmetic; the token mean is the one batching cannot change.

The official code calibrates with batch size 1 and replays the decoder layer by layer. Here one forward pass
per padded batch collects every module's statistic at once; padded positions are excluded token by token (and
left padding gets explicit ``position_ids``), so any batch size gives the statistics of batch size 1. Sums are
accumulated in float64; one fp64 vector per module is all that is kept between batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustlab.antidote.targets import input_dim, output_embedding_modules, resolve_targets
from robustlab.errors import UserError

__all__ = [
    "CalibrationStatistics",
    "batch_tensors",
    "calibration_batches",
    "calibration_hash",
    "collect_statistics",
    "model_device",
]

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


def batch_tensors(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise UserError(
            "each calibration batch must be a mapping with 'input_ids' (and 'attention_mask')",
            "build batches with robustlab.antidote.calibration.calibration_batches",
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
        ids, mask = batch_tensors(batch)
        for row in range(ids.shape[0]):
            seq = ids[row][mask[row].bool()].to(torch.int64).cpu().numpy().tobytes()
            digests.append(hashlib.sha256(seq).hexdigest())
    total = hashlib.sha256()
    for d in sorted(digests):
        total.update(d.encode())
    return f"sha256:{total.hexdigest()}"


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
    """Forward hooks that add up ``x_j^2`` over non-padded tokens; they only read the inputs.

    Each sequence's real tokens are one contiguous run of the flattened ``(batch * seq, dim)`` input (left
    or right padding), so a hook reduces views of the input and copies nothing: per sequence, the squared
    float32 norm of every channel (the official ``torch.norm(inp, p=2) ** 2`` of a sample; float64 for a
    float64 model), summed over sequences in float64. A mask with holes falls back to gathering its rows.
    """

    def __init__(self, targets: Mapping[str, nn.Module]) -> None:
        self.targets = targets
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = dict.fromkeys(targets, 0)
        self.rows = 0  # flattened (batch * seq) size of the batch in flight
        self.runs: list[tuple[int, int]] = []  # [start, end) of each sequence's real tokens, flattened
        self.gather: torch.Tensor | None = None  # the real tokens' flat indices, for masks with holes
        self.count = 0
        self.handles: list[Any] = []

    def set_batch(self, mask: torch.Tensor) -> None:
        flat = mask.bool()
        self.rows, width = flat.numel(), flat.shape[-1]
        self.count = int(flat.sum())
        self.runs, self.gather = [], None
        for r, row in enumerate(flat.reshape(-1, width).cpu()):
            idx = row.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            first, last = int(idx[0]), int(idx[-1]) + 1
            if last - first != idx.numel():  # holes: gather the rows instead
                self.runs, self.gather = [], flat.reshape(-1).nonzero().squeeze(1)
                return
            self.runs.append((r * width + first, r * width + last))

    def hook(self, name: str, dim: int):
        def collect(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] != dim:
                raise RuntimeError(f"{name}: input has {x.shape[-1]} features, weight expects {dim}")
            rows = x.reshape(-1, dim)
            # (batch, seq, dim) inputs flatten row-major, so the flat token positions of the mask apply
            if rows.shape[0] != self.rows:
                raise UserError(
                    f"module {name} sees {rows.shape[0]} input rows for a batch of {self.rows} tokens, "
                    "so its inputs cannot be matched to calibration tokens",
                    "leave it out of the targets (e.g. mixture-of-experts expert layers)",
                )
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            parts = (
                [rows.index_select(0, self.gather.to(x.device))]
                if self.gather is not None
                else [rows[a:b] for a, b in self.runs]
            )
            total = self.sums.get(name)
            if total is None:
                total = self.sums[name] = torch.zeros(dim, dtype=torch.float64, device=x.device)
            for part in parts:
                total += torch.linalg.vector_norm(part, 2, dim=0, dtype=acc).double().square()
            self.tokens[name] += self.count

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


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class CalibrationStatistics:
    """Per target module: ``mean_sq[name]`` the float64 mean over calibration tokens of ``x_j^2`` (one entry
    per input channel) and ``tokens[name]`` how many tokens it saw."""

    mean_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def calibration_tokens(self) -> int:
        """Tokens per module (the same for every module a plain forward pass reaches)."""
        return max(self.tokens.values(), default=0)


def collect_statistics(
    model: nn.Module,
    calibration: Iterable[Any],
    targets: str | Sequence[str] | Mapping[str, nn.Module] = "auto",
    progress: bool = False,
    device: torch.device | str | None = None,
) -> CalibrationStatistics:
    """One no-grad forward pass of the *unpruned* model per calibration batch, hooks on the target modules.

    ``calibration``: batches, each a mapping with ``input_ids`` and ``attention_mask`` (1 = real token,
    0 = padding; left or right padding). Batches go to ``device`` (default: the device of the model's first
    parameter, where the embedding of a device-mapped model lives). The output logits are computed for one
    position only when the model allows it (``logits_to_keep``), so a pass holds one batch of activations.
    Raises :class:`UserError` for an empty calibration set, malformed batches, or a target the forward pass
    never reaches.
    """
    chosen = dict(targets) if isinstance(targets, Mapping) else resolve_targets(model, targets)
    dev = torch.device(device) if device is not None else model_device(model)
    accepted = _forward_kwargs(model)
    heads = output_embedding_modules(model)
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
                ids, mask = batch_tensors(batch)
                if int(mask.sum()) == 0:
                    continue
                ids, mask = ids.to(dev), mask.to(dev)
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
    stats = CalibrationStatistics()
    for name in chosen:
        tokens = collector.tokens[name]
        if tokens == 0 or name not in collector.sums:
            raise UserError(
                f"target module {name} was never called during calibration",
                "leave it out of the targets (it does not take part in the forward pass)",
            )
        stats.mean_sq[name] = collector.sums.pop(name) / tokens
        stats.tokens[name] = tokens
    return stats
