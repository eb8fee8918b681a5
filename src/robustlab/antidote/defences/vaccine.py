"""Vaccine (Huang et al., NeurIPS 2024): perturbation-aware alignment. Alignment stage.

As the official code does it (``git-disl/Antidote`` ``trainer.py`` ``BaseTrainer`` L340-486,
``script/alignment/vaccine.sh``, RHO=2), every alignment step takes two passes over the same batch:

1. forward + backward; record ``g_l``, the gradient of the loss with respect to the output of every attention
   module ``l`` (the "hidden embedding" the paper perturbs);
2. perturb: ``ε_l = ρ · g_l / ‖g‖₂`` with the norm taken jointly over all layers, so ``‖ε‖₂ = ρ`` (the official
   code divides by ``‖g‖ + 1e-7``); add ``ε_l`` to each attention output in a second forward, and step the
   optimiser with the gradient of that perturbed loss.

The fine-tuning that follows is plain SFT. Here the first pass uses ``torch.autograd.grad`` with respect to
the captured attention outputs (no parameter gradients are formed, which the official code discards anyway),
and the perturbation is added through a forward hook. ``module_kind="layer"`` perturbs the decoder layers'
hidden states instead (a variant, not the paper's default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from robustlab.antidote.defences.common import add_to_outputs, capture_outputs, find_modules
from robustlab.antidote.train import TrainConfig, TrainResult, response_loss, train

#: ``RHO=2`` in ``script/alignment/vaccine.sh``.
RHO = 2.0
EPS = 1e-7


@dataclass
class VaccineConfig:
    rho: float = RHO
    module_kind: str = "attention"


def vaccine_perturbation(grads: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """``ε_l = ρ g_l / (‖g‖₂ + 1e-7)`` with ``‖g‖₂`` the norm of all layers' gradients together."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    scale = rho / (float(norm) + EPS)
    return {name: (g * scale).detach() for name, g in grads.items()}


class VaccineLoss:
    """A ``loss_fn`` for :func:`robustlab.antidote.train.train`: returns the loss under the worst-case
    (first-order) perturbation of norm ``rho`` of the attention outputs. ``last_perturbation`` keeps the
    last step's ``ε`` (for inspection and tests)."""

    def __init__(
        self,
        rho: float = RHO,
        module_kind: str = "attention",
        base_loss: Callable[[Any, dict], torch.Tensor] = response_loss,
    ) -> None:
        if rho < 0:
            from robustlab.errors import UserError

            raise UserError(f"Vaccine rho must be >= 0, got {rho}", "use e.g. rho: 2 (the paper's default)")
        self.rho = rho
        self.module_kind = module_kind
        self.base_loss = base_loss
        self.last_perturbation: dict[str, torch.Tensor] = {}
        self._modules: list | None = None

    def modules(self, model: Any) -> list:
        if self._modules is None:
            self._modules = find_modules(model, self.module_kind)
        return self._modules

    def gradients(self, model: Any, batch: dict) -> dict[str, torch.Tensor]:
        """Pass 1: the gradient of the loss with respect to each module's output."""
        mods = self.modules(model)
        with capture_outputs(mods) as outs:
            loss = self.base_loss(model, batch)
        names = [n for n, _ in mods if n in outs and outs[n].requires_grad]
        grads = torch.autograd.grad(loss, [outs[n] for n in names], allow_unused=True)
        return {
            n: (g if g is not None else torch.zeros_like(outs[n])) for n, g in zip(names, grads, strict=True)
        }

    def __call__(self, model: Any, batch: dict) -> torch.Tensor:
        grads = self.gradients(model, batch)
        eps = vaccine_perturbation(grads, self.rho)
        self.last_perturbation = eps
        with add_to_outputs(self.modules(model), eps):
            return self.base_loss(model, batch)


def train_vaccine(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    config: TrainConfig,
    *,
    rho: float = RHO,
    module_kind: str = "attention",
    log: Callable[..., None] | None = None,
    **_: Any,
) -> tuple[Any, TrainResult]:
    """Vaccine alignment: :func:`robustlab.antidote.train.train` with :class:`VaccineLoss`."""
    return train(model, tokenizer, examples, config, loss_fn=VaccineLoss(rho, module_kind), log=log)
