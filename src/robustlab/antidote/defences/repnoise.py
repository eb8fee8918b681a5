"""RepNoise (Rosati et al., 2024): representation noising. Alignment stage, *as published*.

Loss per step (``repnoise_loss.py`` of the RepNoise / Booster / Antidote code)::

    L = CE(harmless batch)
        + β · mean_l MMD_RBF(masked MLP outputs of layer l on the harmful batch, masked Gaussian noise)
        - α · log( mean over the final logits and every layer's logit-lens of masked CE(harmful batch) + 1 )

with α = 0.1 (``--rho``) and β = 0.001 (``--lamb``) in the Antidote scripts. The harmful batch is a batch of
**harmful** prompt -> harmful answer pairs. (The official Antidote script feeds ``BeaverTails_dangerous`` with
the default ``poison_ratio=0.1``, so about 90% of its "harmful" batches are SST-2: that bug is not reproduced
here; see ``papers/antidote.md`` §6.) The harmless batch is the alignment batch of the training loop.

The token mask is the answer tokens of the harmful batch (``labels != -100``): the published code masks the
positions where paired harmful and harmless ids differ, which for pairs sharing a prompt is the answer; one
official variant uses the labels directly, as here, which does not need paired batches.

:func:`mmd_rbf` is the official ``MMD_loss`` (a sum of 5 Gaussian kernels with bandwidths
``b·2^(i-2)``, ``b`` the mean pairwise squared distance; ``mean(XX + YY - XY - YX)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from robustlab.antidote.defences.common import BatchStream, capture_outputs, find_modules
from robustlab.antidote.train import IGNORE_INDEX, TrainConfig, TrainResult, response_loss, train

ALPHA = 0.1
BETA = 0.001
#: The Booster repo's RepNoise alignment settings (lr 5e-4, constant schedule).
TRAIN_SETTINGS = {"lr": 5e-4, "schedule": "constant"}


def mmd_rbf(
    source: torch.Tensor, target: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5
) -> torch.Tensor:
    """Squared MMD between the rows of ``source`` (n, d) and ``target`` (m, d) with the official multi-bandwidth
    Gaussian kernel. The bandwidth is data-dependent and treated as a constant (``.data`` officially)."""
    n = source.shape[0]
    total = torch.cat([source, target], dim=0)
    d2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    m = total.shape[0]
    bandwidth = d2.detach().sum() / (m * m - m)
    bandwidth = bandwidth / (kernel_mul ** (kernel_num // 2))
    kernels = sum(torch.exp(-d2 / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
    xx, yy = kernels[:n, :n], kernels[n:, n:]
    xy, yx = kernels[:n, n:], kernels[n:, :n]
    return torch.mean(xx + yy - xy - yx)


def _final_norm(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in (
        "model.norm",
        "model.final_layernorm",
        "transformer.ln_f",
        "gpt_neox.final_layer_norm",
        "model.decoder.final_layer_norm",
    ):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions with ``labels != -100``."""
    shift = logits[:, :-1].float()
    target = labels[:, 1:]
    return F.cross_entropy(shift.reshape(-1, shift.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX)


def repnoise_terms(
    model: Any, harmful: dict, harmless: dict, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The three terms of the RepNoise loss: ``harmless`` CE, ``noise`` (mean over layers of the MMD) and
    ``harmful`` (the mean masked CE over final logits and the logit lens of every hidden state)."""
    mlps = find_modules(model, "mlp")
    with capture_outputs(mlps) as acts:
        out = model(
            input_ids=harmful["input_ids"],
            attention_mask=harmful["attention_mask"],
            output_hidden_states=True,
        )
    mask = (harmful["labels"] != IGNORE_INDEX).unsqueeze(-1)
    noise = 0.0
    for name, _ in mlps:
        hidden = acts[name]
        m = mask.to(hidden.dtype)
        reps = hidden * m
        gauss = torch.randn(reps.shape, generator=generator, dtype=reps.dtype).to(reps.device) * m
        noise = noise + mmd_rbf(reps.reshape(reps.shape[0], -1), gauss.reshape(gauss.shape[0], -1))
    noise = noise / len(mlps)
    head = model.get_output_embeddings()
    norm = _final_norm(model)
    harm = masked_ce(out.logits, harmful["labels"])
    count = 1
    if head is not None and norm is not None and out.hidden_states is not None:
        for h in out.hidden_states:
            harm = harm + masked_ce(head(norm(h)), harmful["labels"])
            count += 1
    return {"harmless": response_loss(model, harmless), "noise": noise, "harmful": harm / count}


class RepNoiseLoss:
    """``loss_fn`` for :func:`robustlab.antidote.train.train`: the loop's batch is the harmless batch; a
    harmful batch is drawn from ``harmful`` each step."""

    def __init__(
        self, harmful: Iterator[dict], alpha: float = ALPHA, beta: float = BETA, seed: int = 0
    ) -> None:
        self.harmful = harmful
        self.alpha = alpha
        self.beta = beta
        self.generator = torch.Generator().manual_seed(seed)
        self.last: dict[str, float] = {}

    def __call__(self, model: Any, batch: dict) -> torch.Tensor:
        t = repnoise_terms(model, next(self.harmful), batch, self.generator)
        self.last = {k: float(v.detach()) for k, v in t.items()}
        return t["harmless"] + self.beta * t["noise"] - self.alpha * torch.log(t["harmful"] + 1)


def train_repnoise(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    config: TrainConfig,
    *,
    harmful: Sequence[Any],
    alpha: float = ALPHA,
    beta: float = BETA,
    log: Callable[..., None] | None = None,
    **_: Any,
) -> tuple[Any, TrainResult]:
    """RepNoise alignment on ``examples`` (harmless) with ``harmful`` prompt -> harmful answer pairs."""
    stream = BatchStream(tokenizer, harmful, config.batch_size, config.max_length, seed=config.seed + 2)
    return train(
        model, tokenizer, examples, config, loss_fn=RepNoiseLoss(stream, alpha, beta, config.seed), log=log
    )
