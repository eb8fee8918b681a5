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

Stage methods share the signature ``(model, tokenizer, examples, config, **extra) -> (model, TrainResult)``;
the extra data they need is passed by keyword: ``harmful=`` (harmful prompt -> harmful answer pairs) for
RepNoise and Booster, ``guide=`` (alignment data) for Lisa. Which function runs a method, with which data and
hyper-parameters, is recorded once, in :data:`robustlab.antidote.methods.REGISTRY`.
"""
