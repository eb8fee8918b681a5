"""LDIFS (Mukhoti et al., 2023): l2 distance in feature space to the aligned model. Fine-tuning stage.

As ``git-disl/Antidote`` ``trainer.py`` ``LDIFSTrainer`` (L214-321) structures it: a frozen copy of the model at
the start of fine-tuning (the aligned model) is kept; on every user batch the loss gains, layer by layer,
``ρ/2 · ‖MLP_out_l(current) - MLP_out_l(frozen)‖²`` with ρ = 1e-4; gradients are clipped at 5.

**As published, not as the official code**: the official trainer adds a layer's term only when it is below
0.1 ("dropping overflow"), so large drifts, exactly the ones that matter, go unregularised. Here every layer's
term is added (``gate=None``); ``gate=0.1`` reproduces the official behaviour for comparison.

Padded positions are excluded from the distance (the official code includes them; padding features are not
features of the data). With a LoRA fine-tuning adapter the frozen features come from the same model with the
adapter disabled (no copy needed); with full fine-tuning a frozen copy is taken at the first step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from robustlab.antidote.defences.common import capture_outputs, find_modules
from robustlab.antidote.train import TrainConfig, TrainResult, response_loss, train

RHO = 1e-4
MAX_GRAD_NORM = 5.0
OFFICIAL_GATE = 0.1


def feature_distance(
    current: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``‖(f_l(current) - f_l(frozen)) ⊙ mask‖²`` per layer ``l`` (the mask zeroes padded positions)."""
    m = attention_mask.unsqueeze(-1)
    out = {}
    for name, cur in current.items():
        diff = (cur - frozen[name].to(cur.device)) * m.to(cur.dtype)
        out[name] = (diff.float() ** 2).sum()
    return out


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class LDIFSLoss:
    """``loss_fn`` for :func:`robustlab.antidote.train.train`: task loss + ``ρ/2 Σ_l d_l`` (see module doc).
    ``last`` keeps the last step's per-layer distances."""

    def __init__(
        self,
        rho: float = RHO,
        gate: float | None = None,
        module_kind: str = "mlp",
        base_loss: Callable[[Any, dict], torch.Tensor] = response_loss,
    ) -> None:
        self.rho = rho
        self.gate = gate
        self.module_kind = module_kind
        self.base_loss = base_loss
        self.frozen: Any = None
        self.last: dict[str, float] = {}

    def frozen_features(self, model: Any, batch: dict) -> dict[str, torch.Tensor]:
        if _is_peft(model):
            ref, ctx = model, model.disable_adapter()
        else:
            if self.frozen is None:
                self.frozen = copy.deepcopy(model).eval()
                for p in self.frozen.parameters():
                    p.requires_grad_(False)
            ref, ctx = self.frozen, contextlib.nullcontext()
        with ctx, torch.no_grad(), capture_outputs(find_modules(ref, self.module_kind)) as feats:
            ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return {k: v.detach() for k, v in feats.items()}

    def __call__(self, model: Any, batch: dict) -> torch.Tensor:
        frozen = self.frozen_features(model, batch)
        with capture_outputs(find_modules(model, self.module_kind)) as feats:
            loss = self.base_loss(model, batch)
        dist = feature_distance(dict(feats), frozen, batch["attention_mask"])
        penalty = 0.0
        for term in dist.values():
            t = 0.5 * self.rho * term
            if self.gate is None or float(t) < self.gate:
                penalty = penalty + t
        self.last = {k: float(v.detach()) for k, v in dist.items()}
        return loss + penalty


def train_ldifs(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    config: TrainConfig,
    *,
    rho: float = RHO,
    gate: float | None = None,
    log: Callable[..., None] | None = None,
    **_: Any,
) -> tuple[Any, TrainResult]:
    """LDIFS fine-tuning (gradient clipping at 5 unless the config sets another value)."""
    if config.max_grad_norm is None:
        import dataclasses

        config = dataclasses.replace(config, max_grad_norm=MAX_GRAD_NORM)
    return train(model, tokenizer, examples, config, loss_fn=LDIFSLoss(rho, gate), log=log)
