"""Booster (Huang et al., ICLR 2025): attenuating harmful perturbation. Alignment stage.

As ``git-disl/Booster`` ``trainer.py`` ``BoosterAlignmentTrainer`` does it (``script/alignment/smooth_align.sh``):
every step takes a harmful batch ``h`` (BeaverTails unsafe prompt -> harmful answer pairs) besides the
alignment batch, and

1. ``g_h = ∇h(w)``;
2. a virtual harmful step ``w' = w - α g_h / ‖g_h‖`` (α = 0.1);
3. the update direction is ``∇L_align(w) + λ (∇h(w) - ∇h(w'))`` (λ = 5),

i.e. the gradient of ``L_align(w) + λ (h(w) - h(w - α g_h/‖g_h‖))`` with the perturbation direction held
fixed: the regulariser rewards a model on which one harmful step reduces the harmful loss little.
Official training settings: lr 5e-4, batch 10, 20 epochs, constant schedule, 5000 harmful samples.

:class:`BoosterLoss` returns a scalar whose *value* is ``L_align(w) + λ (h(w) - h(w'))`` and whose *gradient*
is the official update direction (a surrogate: ``λ Σ (g_h - g_h')·w`` with the gradients detached carries the
regulariser's gradient), so it plugs into the plain training loop unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from robustlab.antidote.defences.common import BatchStream, trainable
from robustlab.antidote.train import TrainConfig, TrainResult, response_loss, train

#: ``--lamb 5 --alpha 0.1`` in ``Booster/script/alignment/smooth_align.sh``.
LAMBDA = 5.0
ALPHA = 0.1
#: The official Booster alignment optimiser settings (for a ``TrainConfig`` override).
TRAIN_SETTINGS = {"lr": 5e-4, "batch_size": 10, "epochs": 20, "schedule": "constant"}
EPS = 1e-7


class BoosterLoss:
    """``loss_fn`` for :func:`robustlab.antidote.train.train` (see the module docstring). ``harmful`` yields
    harmful batches. ``last`` keeps the last step's ``h(w)``, ``h(w')`` and ``L_align``."""

    def __init__(
        self,
        harmful: Iterator[dict],
        lam: float = LAMBDA,
        alpha: float = ALPHA,
        base_loss: Callable[[Any, dict], torch.Tensor] = response_loss,
    ) -> None:
        self.harmful = harmful
        self.lam = lam
        self.alpha = alpha
        self.base_loss = base_loss
        self.last: dict[str, float] = {}

    def __call__(self, model: Any, batch: dict) -> torch.Tensor:
        named = trainable(model)
        params = [p for _, p in named]
        hb = next(self.harmful)
        h = self.base_loss(model, hb)
        g = torch.autograd.grad(h, params, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params, strict=True)]
        norm = float(torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))) + EPS
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g, strict=True):
                p.sub_(self.alpha * gi / norm)
        try:
            h2 = self.base_loss(model, hb)
            g2 = torch.autograd.grad(h2, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
        g2 = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g2, params, strict=True)]
        align = self.base_loss(model, batch)
        surrogate = sum(((a - b).detach() * p).sum() for a, b, p in zip(g, g2, params, strict=True))
        reg_value = (h - h2).detach()
        self.last = {
            "harmful_loss": float(h.detach()),
            "harmful_loss_after_step": float(h2.detach()),
            "align_loss": float(align.detach()),
        }
        return align + self.lam * (surrogate - surrogate.detach() + reg_value)


def train_booster(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    config: TrainConfig,
    *,
    harmful: Sequence[Any],
    lam: float = LAMBDA,
    alpha: float = ALPHA,
    log: Callable[..., None] | None = None,
    **_: Any,
) -> tuple[Any, TrainResult]:
    """Booster alignment on ``examples`` with harmful pairs ``harmful`` (prompt -> harmful answer)."""
    stream = BatchStream(tokenizer, harmful, config.batch_size, config.max_length, seed=config.seed + 1)
    return train(model, tokenizer, examples, config, loss_fn=BoosterLoss(stream, lam, alpha), log=log)
