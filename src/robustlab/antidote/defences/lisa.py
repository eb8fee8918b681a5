"""Lisa (Huang et al., NeurIPS 2024): lazy safety alignment by bi-state optimisation. Fine-tuning stage.

As ``git-disl/Antidote`` ``trainer.py`` ``ADMMTrainer`` (L43-212) does it: fine-tuning alternates between an
**alignment state** of ``alignment_steps`` (100) steps on alignment ("guide") data and a **fine-tuning state** of
``finetune_steps`` (900) steps on the user's data. Each switch snapshots the weights of the state being left.
Every step adds the proximal term ``ρ/2 · ‖w - w_other‖²`` (over the trainable parameters, ``w_other`` the last
snapshot of the *other* state), but only after the first 10% of all steps. ρ = 1 for SST-2 (ρ = 0.1 in the
GSM8K lr sweep and the rebuttal). The step budget is the SFT one (steps taken in the alignment state use guide
batches in place of user batches, as the official trainer does).

[R] The trainer starts in the alignment state (the official ``init`` sets ``status = "alignment"``; this could
not be re-checked against the code, so it is a setting: ``start="alignment"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from robustlab.antidote.defences.common import BatchStream, total_steps, trainable
from robustlab.antidote.train import TrainConfig, TrainResult, response_loss, train
from robustlab.errors import UserError

RHO = 1.0
ALIGNMENT_STEPS = 100
FINETUNE_STEPS = 900
WARMUP_FRACTION = 0.1
#: ``guide_data_num=10000`` safe rows in the official scripts.
GUIDE_SIZE = 10000


def proximal_term(
    named_params: Sequence[tuple[str, torch.Tensor]], anchor: dict[str, torch.Tensor], rho: float
) -> torch.Tensor:
    """``ρ/2 · Σ ‖w - anchor‖²`` over the named parameters."""
    total = sum(((p - anchor[n].to(p.device)) ** 2).sum() for n, p in named_params)
    return 0.5 * rho * total


class LisaLoss:
    """``loss_fn`` for :func:`robustlab.antidote.train.train`, holding the bi-state schedule.

    ``guide`` yields alignment batches; ``total`` is the run's step count (the 10% warm-up of the proximal
    term is measured against it). ``history`` records ``(step, state, proximal term)`` per step."""

    def __init__(
        self,
        guide: Iterator[dict],
        total: int,
        rho: float = RHO,
        alignment_steps: int = ALIGNMENT_STEPS,
        finetune_steps: int = FINETUNE_STEPS,
        warmup_fraction: float = WARMUP_FRACTION,
        start: str = "alignment",
        base_loss: Callable[[Any, dict], torch.Tensor] = response_loss,
    ) -> None:
        if alignment_steps <= 0 or finetune_steps <= 0:
            raise UserError(
                "Lisa's alignment_steps and finetune_steps must be positive", "use e.g. 100 and 900"
            )
        if start not in ("alignment", "finetune"):
            raise UserError(f"unknown Lisa start state {start!r}", "use alignment or finetune")
        self.guide = guide
        self.total = total
        self.rho = rho
        self.lengths = {"alignment": alignment_steps, "finetune": finetune_steps}
        self.warmup = warmup_fraction * total
        self.state = start
        self.base_loss = base_loss
        self.clock = 0
        self.steps = 0
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}
        self.history: list[tuple[int, str, float]] = []

    def _switch(self, model: Any) -> None:
        self.snapshots[self.state] = {n: p.detach().clone() for n, p in trainable(model)}
        self.state = "finetune" if self.state == "alignment" else "alignment"
        self.clock = 0

    def __call__(self, model: Any, batch: dict) -> torch.Tensor:
        if not self.snapshots:  # both anchors start at the initial weights
            init = {n: p.detach().clone() for n, p in trainable(model)}
            self.snapshots = {"alignment": init, "finetune": {n: t.clone() for n, t in init.items()}}
        if self.clock >= self.lengths[self.state]:
            self._switch(model)  # runs after the previous optimiser step: the snapshot is the state's result
        if self.state == "alignment":
            batch = next(self.guide)
        loss = self.base_loss(model, batch)
        prox = 0.0
        if self.steps > self.warmup and self.rho > 0:
            other = "finetune" if self.state == "alignment" else "alignment"
            term = proximal_term(trainable(model), self.snapshots[other], self.rho)
            prox = float(term.detach())
            loss = loss + term
        self.history.append((self.steps, self.state, prox))
        self.clock += 1
        self.steps += 1
        return loss


def train_lisa(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    config: TrainConfig,
    *,
    guide: Sequence[Any],
    rho: float = RHO,
    alignment_steps: int = ALIGNMENT_STEPS,
    finetune_steps: int = FINETUNE_STEPS,
    log: Callable[..., None] | None = None,
    **_: Any,
) -> tuple[Any, TrainResult]:
    """Lisa fine-tuning on ``examples`` with alignment data ``guide``."""
    stream = BatchStream(tokenizer, guide, config.batch_size, config.max_length, seed=config.seed + 3)
    total = total_steps(len(examples), config.batch_size, config.epochs, config.max_steps)
    loss = LisaLoss(stream, total, rho, alignment_steps, finetune_steps)
    return train(model, tokenizer, examples, config, loss_fn=loss, log=log)
