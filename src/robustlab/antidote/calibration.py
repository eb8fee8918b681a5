"""The re-alignment (calibration) set and the statistic Wanda needs from it (``papers/antidote.md`` §1.1, §1.4).

Antidote's calibration pass runs the *unpruned* fine-tuned model over harmful prompt + answer sequences and,
for every input channel ``j`` of every target module, accumulates ``x_j^2``. The official code
(``WrappedGPT.add_batch``) keeps the running mean over samples of the per-sample sum over tokens; here the
statistic is the mean over all non-padded tokens, ``(1/N_tokens) Σ_samples Σ_tokens x_j^2``. The two differ
by the factor ``N_tokens / N_samples``, the same for every channel of every module, so every per-row ranking
(hence every mask) is the same in exact arithmetic; the token mean is the one batching cannot change.

The official code calibrates with batch size 1 and replays the decoder layer by layer. Here one forward pass
per padded batch collects every module's statistic at once; padded positions are excluded token by token (and
left padding gets explicit ``position_ids``), so any batch size gives the statistics of batch size 1. A batch's
channel sums are taken in the input's precision (float64 for a float64 model) and added up across batches in
float64; one fp64 vector per module is all that is kept between batches.
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


class _StopForward(Exception):
    """Raised by the last target's hook: the rest of the forward pass (later layers, the LM head) cannot
    change any statistic, so calibration does not pay for it."""


class _Collector:
    """Forward pre-hooks that add up ``x_j^2`` over non-padded tokens; they only read the inputs.

    Per batch and module, one product ``w @ x^2`` of the flattened ``(batch * seq, dim)`` input with the
    0/1 token weights ``w`` (the attention mask: left or right padding, or holes) gives the channel sums in
    the input's precision (float32 for float32, bfloat16 and float16 models, float64 for float64), added to
    a float64 vector per module. Modules fed the very same input tensor (``q_proj``/``k_proj``/``v_proj``
    and their LoRA ``A`` matrices, ``gate_proj``/``up_proj``) share one reduction.

    After the first batch, when every target was called exactly once per forward pass (the usual decoder;
    a shared or repeated module disables it), the hook of the target called last stops the forward pass
    with :class:`_StopForward`: the later layers and the LM head cannot change a statistic.
    """

    def __init__(self, targets: Mapping[str, nn.Module], early_stop: bool = True) -> None:
        self.targets = targets
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = dict.fromkeys(targets, 0)
        self.rows = 0  # flattened (batch * seq) size of the batch in flight
        self.count = 0
        self.mask: torch.Tensor | None = None  # the batch's flattened 0/1 mask
        self.weights: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        # per (features, precision, device): the input whose sums the scratch vector holds, and its version
        self.last: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, int]] = {}
        self.calls: list[str] = []  # targets in call order, during the first batch
        self.stop_after: str | None = None  # the target whose hook ends the forward pass
        self.early_stop = early_stop
        self.batches = 0
        self.handles: list[Any] = []
        self.scratch: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def set_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1)
        self.rows = self.mask.numel()
        self.count = int(self.mask.sum())
        # the token weights, made before the forward pass (not during it, see _channel_sums)
        self.weights = {(t, mask.device): self.mask.to(t) for t in (torch.float32, torch.float64)}
        self.last.clear()
        self.calls.clear()

    def end_batch(self) -> None:
        """After a forward pass: on the first batch, decide whether later passes may stop early."""
        self.last.clear()
        self.weights.clear()
        if self.batches == 0 and self.early_stop:
            once = len(self.calls) == len(self.targets) and set(self.calls) == set(self.targets)
            self.stop_after = self.calls[-1] if once else None
        self.batches += 1

    def _channel_sums(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``w @ x^2``, once per distinct input tensor, into a scratch vector per (features, precision,
        device) that lives as long as the collector: small allocations made during a forward pass and kept
        would pin the heap between the pass's large temporaries and grow the resident set."""
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        key = (rows.shape[1], acc, rows.device)
        out = self.scratch.get(key)
        if out is None:
            out = self.scratch[key] = torch.empty(rows.shape[1], dtype=acc, device=rows.device)
        seen = self.last.get(key)
        if seen is not None and seen[0] is x and seen[1] == x._version:
            return out  # the same tensor as the previous module's input (q/k/v, gate/up)
        w = self.weights.get(key[1:])
        if w is None:  # a target on another device than the inputs (a device map)
            w = self.weights[key[1:]] = self.mask.to(device=rows.device, dtype=acc)
        self.last[key] = (x, x._version)
        return torch.mv(rows.to(acc).square().t(), w, out=out)

    def hook(self, name: str, dim: int):
        def collect(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] != dim:
                raise RuntimeError(f"{name}: input has {x.shape[-1]} features, weight expects {dim}")
            # (batch, seq, dim) inputs flatten row-major, so the flat token positions of the mask apply
            rows = x.reshape(-1, dim)
            if rows.shape[0] != self.rows:
                raise UserError(
                    f"module {name} sees {rows.shape[0]} input rows for a batch of {self.rows} tokens, "
                    "so its inputs cannot be matched to calibration tokens",
                    "leave it out of the targets (e.g. mixture-of-experts expert layers)",
                )
            self.sums[name].add_(self._channel_sums(x, rows))
            self.tokens[name] += self.count
            if self.batches == 0:
                self.calls.append(name)
            elif name == self.stop_after:
                raise _StopForward

        return collect

    def __enter__(self) -> _Collector:
        # every float64 sum is a view of one buffer per device, allocated before any forward pass
        dims = {name: m.weight.shape[input_dim(m)] for name, m in self.targets.items()}
        devices = {name: m.weight.device for name, m in self.targets.items()}
        for dev in set(devices.values()):
            names = [n for n in self.targets if devices[n] == dev]
            buffer = torch.zeros(sum(dims[n] for n in names), dtype=torch.float64, device=dev)
            for name, part in zip(names, buffer.split([dims[n] for n in names]), strict=True):
                self.sums[name] = part
        for name, module in self.targets.items():
            dim = dims[name]
            self.handles.append(module.register_forward_pre_hook(self.hook(name, dim), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.last.clear()


def _has_accelerate_hooks(model: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in model.modules())


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
        # accelerate's offloading hooks must see every module's forward end: no early stop there
        early = not getattr(model, "hf_device_map", None) and not _has_accelerate_hooks(model)
        with _Collector(chosen, early) as collector, torch.no_grad():
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
                with contextlib.suppress(_StopForward):
                    model(**kwargs)
                collector.end_batch()
                seen += collector.count
    finally:
        model.train(was_training)
    if seen == 0:
        raise UserError(
            "the calibration set is empty (no non-padded tokens)", "give at least one calibration text"
        )
    stats = CalibrationStatistics()
    for name in chosen:
        tokens = collector.tokens[name]
        if tokens == 0:
            raise UserError(
                f"target module {name} was never called during calibration",
                "leave it out of the targets (it does not take part in the forward pass)",
            )
        stats.mean_sq[name] = collector.sums[name] / tokens
        stats.tokens[name] = tokens
    return stats
