"""Shared pieces of the defences: finding attention / MLP modules, capturing and replacing their outputs, and
cycling batch streams over auxiliary data (harmful pairs, alignment "guide" data).

Module kinds (any decoder architecture transformers 5.x loads):

- ``"attention"``: modules whose class name ends in ``Attention`` (``LlamaAttention``, ``Qwen2Attention``,
  ``MistralAttention``, ``GemmaAttention``, ``GPT2Attention``, ``GPTNeoXAttention``, ``OPTAttention`` ...), the
  outermost one when attention modules nest. Their output is a tuple whose first entry is the attention
  output (batch, seq, hidden).
- ``"mlp"``: modules whose class name ends in ``MLP`` (``LlamaMLP``, ``GPT2MLP``, ``GPTNeoXMLP`` ...), or that
  are named ``mlp`` / ``feed_forward``; their output is a tensor (batch, seq, hidden).
- ``"layer"``: the decoder layers (``...DecoderLayer``, ``GPT2Block``, ``GPTNeoXLayer``): the hidden state.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from robustlab.antidote.train import collate, encode_example, pad_id
from robustlab.errors import UserError

KINDS = ("attention", "mlp", "layer")


def _matches(kind: str, name: str, module: nn.Module) -> bool:
    cls = type(module).__name__
    if kind == "attention":
        return cls.endswith("Attention")
    if kind == "mlp":
        return cls.endswith("MLP") or name.rsplit(".", 1)[-1] in ("mlp", "feed_forward")
    if kind == "layer":
        return cls.endswith(("DecoderLayer", "Block", "Layer")) and not cls.endswith(("LoraLayer", "Linear"))
    raise UserError(f"unknown module kind {kind!r}", f"choose from {', '.join(KINDS)}")


def find_modules(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    """The outermost modules of ``kind`` in forward order (``named_modules`` order). ``UserError`` if none."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or not _matches(kind, name, module):
            continue
        if any(name.startswith(prev + ".") for prev, _ in found):
            continue  # nested inside an already chosen module
        found.append((name, module))
    if kind == "layer":  # keep only modules that sit in a ModuleList (the decoder stack)
        found = [(n, m) for n, m in found if n.rsplit(".", 1)[-1].isdigit()]
    if not found:
        raise UserError(
            f"the model has no {kind} modules to hook",
            "use a decoder model with standard attention/MLP blocks, or pick another module kind",
        )
    return found


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (a tensor, or the first entry of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden-state tensor in a module output of type {type(output).__name__}")


def replace_first(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced by ``new`` (same container type)."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    return [new, *output[1:]]


@contextlib.contextmanager
def capture_outputs(modules: Sequence[tuple[str, nn.Module]]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of a listed module stores its hidden-state output (the graph is kept,
    so gradients can flow through it) under the module name; a later forward overwrites an earlier one."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules:

        def hook(_m: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
            store[name] = first_tensor(out)

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def add_to_outputs(
    modules: Sequence[tuple[str, nn.Module]], deltas: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Within the block, each listed module's hidden-state output is replaced by ``output + deltas[name]``."""
    handles = []
    for name, module in modules:
        if name not in deltas:
            continue

        def hook(_m: nn.Module, _inp: Any, out: Any, name: str = name) -> Any:
            t = first_tensor(out)
            return replace_first(out, t + deltas[name].to(dtype=t.dtype, device=t.device))

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the optimiser updates (``requires_grad``), by name."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class BatchStream:
    """An endless stream of training batches over ``examples`` (objects with ``.prompt`` and ``.output``),
    encoded like the training loop's (loss on the answer only), reshuffled every pass from ``seed``."""

    def __init__(
        self, tokenizer: Any, examples: Sequence[Any], batch_size: int, max_length: int, seed: int = 0
    ) -> None:
        if not examples:
            raise UserError("an auxiliary data set of a defence is empty", "pass at least one example")
        self.feats = [encode_example(tokenizer, e.prompt, e.output, max_length) for e in examples]
        self.pad = pad_id(tokenizer)
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def _take(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.feats)))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out

    def next_indices(self) -> list[int]:
        return self._take()

    def batch(self, indices: Sequence[int]) -> dict:
        return collate([self.feats[i] for i in indices], self.pad)

    def __next__(self) -> dict:
        return self.batch(self._take())

    def __iter__(self) -> BatchStream:
        return self


def pad_pair(a: dict, b: dict, pad: int) -> tuple[dict, dict]:
    """Right-pad two collated batches to the same width (RepNoise compares them token by token)."""
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def widen(batch: dict) -> dict:
        extra = width - batch["input_ids"].shape[1]
        if extra == 0:
            return batch
        out = {}
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100)):
            t = batch[key]
            out[key] = torch.cat([t, torch.full((t.shape[0], extra), fill, dtype=t.dtype)], dim=1)
        return out

    return widen(a), widen(b)


def total_steps(n_examples: int, batch_size: int, epochs: float, max_steps: int | None = None) -> int:
    """The number of optimiser steps :func:`robustlab.antidote.train.train` takes (the same formula)."""
    import math

    total = math.ceil(math.ceil(n_examples / batch_size) * epochs)
    return min(total, max_steps) if max_steps is not None else total
