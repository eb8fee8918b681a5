"""The paper's comparison set, on the same harness as Antidote (``papers/antidote.md`` §6).

One module per method, each a small piece over the plain training loop of
:mod:`robustlab.antidote.train` (a ``loss_fn``) or a post-hoc weight transform:

============  ==================  ===============================================================
method        stage               module / entry point
============  ==================  ===============================================================
sft           alignment, ft       :func:`robustlab.antidote.train.train`
vaccine       alignment           :mod:`.vaccine` (``VaccineLoss``, ``train_vaccine``; ρ = 2)
repnoise      alignment           :mod:`.repnoise` (``RepNoiseLoss``; α = 0.1, β = 0.001; truly harmful batches)
booster       alignment           :mod:`.booster` (``BoosterLoss``; λ = 5, α = 0.1)
lisa          fine-tuning         :mod:`.lisa` (``LisaLoss``; ρ = 1, 100/900 steps)
ldifs         fine-tuning         :mod:`.ldifs` (``LDIFSLoss``; ρ = 1e-4, no < 0.1 gate)
antidote      post-fine-tuning    :func:`robustlab.antidote.realign.realign` (+ random / magnitude controls)
safelora      post-fine-tuning    :func:`.safelora.safelora` (threshold 0.5)
resta         post-fine-tuning    :func:`.resta.resta` (safety vector + DARE)
============  ==================  ===============================================================

Stage methods share the signature ``(model, tokenizer, examples, config, **extra) -> (model, TrainResult)``
of :data:`robustlab.antidote.train.STAGE_METHODS`; the extra data they need is passed by keyword:
``harmful=`` (harmful prompt -> harmful answer pairs) for RepNoise and Booster, ``guide=`` (alignment data)
for Lisa. :func:`register_stage_methods` adds them to ``STAGE_METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Alignment-stage defences: name -> (module, function, extra data keyword or None).
ALIGNMENT_METHODS = {
    "sft": None,
    "vaccine": ("vaccine", "train_vaccine", None),
    "repnoise": ("repnoise", "train_repnoise", "harmful"),
    "booster": ("booster", "train_booster", "harmful"),
}
#: Fine-tuning-stage defences.
FINETUNE_METHODS = {
    "sft": None,
    "lisa": ("lisa", "train_lisa", "guide"),
    "ldifs": ("ldifs", "train_ldifs", None),
}
#: Post-fine-tuning defences.
POST_METHODS = ("none", "antidote", "random", "magnitude", "safelora", "resta")
#: Every method name the pipeline's ``method:`` key accepts.
METHODS = ("sft", "vaccine", "repnoise", "booster", "lisa", "ldifs", "antidote", "safelora", "resta")


def stage_function(name: str) -> Callable[..., Any]:
    """The training function of a stage method (``sft`` is the plain loop)."""
    import importlib

    from robustlab.antidote.train import train
    from robustlab.errors import UserError

    entry = {**ALIGNMENT_METHODS, **FINETUNE_METHODS}.get(name, "missing")
    if entry == "missing":
        raise UserError(
            f"unknown training-stage method {name!r}",
            f"choose from {', '.join(dict.fromkeys([*ALIGNMENT_METHODS, *FINETUNE_METHODS]))}",
        )
    if entry is None:
        return train
    module = importlib.import_module(f"robustlab.antidote.defences.{entry[0]}")
    return getattr(module, entry[1])


def extra_data_key(name: str) -> str | None:
    """The keyword of the auxiliary data a stage method needs (``harmful``, ``guide``) or None."""
    entry = {**ALIGNMENT_METHODS, **FINETUNE_METHODS}.get(name)
    return entry[2] if entry else None


def register_stage_methods() -> None:
    """Add every training-stage defence to :data:`robustlab.antidote.train.STAGE_METHODS`."""
    from robustlab.antidote.train import STAGE_METHODS

    for name in (*ALIGNMENT_METHODS, *FINETUNE_METHODS):
        if name not in STAGE_METHODS:
            STAGE_METHODS[name] = stage_function(name)
