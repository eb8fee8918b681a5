"""Client-side losses for FedLD and its baselines (torch): margin control, FedProx, MOON, SCAFFOLD, FedPAC.

All functions are pure: they take tensors and return a scalar tensor that is differentiable in the
local model's outputs/parameters; the caller adds them to its loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from robustlab.errors import UserError


def margin_control_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lam: float = 0.1,
    per_sample: bool = False,
) -> torch.Tensor:
    """FedLD's local loss: cross-entropy plus margin control, ``CE + λ·log(1 + ‖softmax(logits)‖²)``.

    As the official code computes it (``methods/fedld.py`` ``MarginalLogLoss``), the norm is the
    **Frobenius norm of the whole B x C softmax matrix** of the batch, so the regulariser is one scalar per
    batch: ``λ·log(1 + Σ_b Σ_c p_bc²)``; the cross-entropy is the batch mean. With ``per_sample=True`` the
    regulariser is instead the batch mean of ``log(1 + ‖p_b‖²)`` (the per-sample reading of the paper's
    formula; its strength does not depend on the batch size).

    ‖p‖² is 1/C for a uniform prediction and 1 for a one-hot one, so the term penalises over-confident
    outputs (a confidence penalty). λ is 0.1 in the official README run (0.03 is the code's default).
    """
    if logits.ndim != 2:
        raise UserError(
            f"margin_control_loss expects logits of shape (batch, classes), got {tuple(logits.shape)}",
            "flatten the model output to (batch, classes)",
        )
    ce = F.cross_entropy(logits, targets)
    probs = torch.softmax(logits, dim=1)
    sq = probs**2
    reg = torch.log1p(sq.sum(dim=1)).mean() if per_sample else torch.log1p(sq.sum())
    return ce + lam * reg


def fedprox_term(
    model_params: Iterable[torch.Tensor],
    global_params: Iterable[torch.Tensor],
    mu: float,
) -> torch.Tensor:
    """The standard FedProx proximal term (Li et al. 2020): ``(μ/2)·‖w − w_global‖²`` over all parameters.

    ``global_params`` are treated as constants (detached). Note that the official FedLD repo's FedProx uses
    ``μ·Σ_tensors ‖w − w_g‖₂`` (non-squared, per tensor) instead; this is the paper's standard form.
    """
    model_params = list(model_params)
    global_params = list(global_params)
    if len(model_params) != len(global_params):
        raise UserError(
            f"fedprox_term got {len(model_params)} model tensors but {len(global_params)} global ones",
            "pass the same parameter list (e.g. model.parameters()) for both",
        )
    if not model_params:
        return torch.zeros(())
    total = torch.zeros((), dtype=model_params[0].dtype, device=model_params[0].device)
    for w, g in zip(model_params, global_params, strict=True):
        if w.shape != g.shape:
            raise UserError(
                f"fedprox_term: shape {tuple(w.shape)} does not match global {tuple(g.shape)}",
                "pass parameters of the same model architecture",
            )
        total = total + ((w - g.detach()) ** 2).sum()
    return 0.5 * mu * total


def moon_contrastive_loss(
    z: torch.Tensor,
    z_global: torch.Tensor,
    z_previous: torch.Tensor | Sequence[torch.Tensor],
    tau: float = 0.5,
) -> torch.Tensor:
    """MOON's model-contrastive loss (Li, He & Song, CVPR 2021), batch mean:

    ``ℓ_con = −log( e^{cos(z, z_glob)/τ} / (e^{cos(z, z_glob)/τ} + Σ_prev e^{cos(z, z_prev)/τ}) )``

    ``z`` is the local model's representation, ``z_global`` that of the frozen global model (positive
    pair), ``z_previous`` that of the client's previous local model (negative pair; a list allows several
    previous models, as in the official MOON code). ``z_global``/``z_previous`` are detached. τ = 0.5 and
    the caller's weight μ ∈ {1, 5} are the usual settings; the caller adds ``μ·ℓ_con`` to its CE loss.
    """
    if tau <= 0:
        raise UserError(f"MOON temperature tau must be > 0, got {tau}", "use 0.5")
    prev = [z_previous] if isinstance(z_previous, torch.Tensor) else list(z_previous)
    if not prev:
        raise UserError("MOON needs at least one previous-model representation", "pass z_previous")
    pos = F.cosine_similarity(z, z_global.detach(), dim=-1).unsqueeze(1)
    negs = [F.cosine_similarity(z, p.detach(), dim=-1).unsqueeze(1) for p in prev]
    logits = torch.cat([pos, *negs], dim=1) / tau
    labels = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    return F.cross_entropy(logits, labels)


def scaffold_correction_term(
    model_params: Iterable[torch.Tensor],
    c_global: Iterable[torch.Tensor],
    c_local: Iterable[torch.Tensor],
) -> torch.Tensor:
    """A loss term whose gradient is SCAFFOLD's correction: ``Σ ⟨w, c − c_i⟩``.

    Adding it to the local loss turns every SGD step's gradient g(w) into g(w) − c_i + c (Karimireddy et
    al. 2020). The control variates are constants (detached).
    """
    model_params = list(model_params)
    c_global = list(c_global)
    c_local = list(c_local)
    if not (len(model_params) == len(c_global) == len(c_local)):
        raise UserError(
            "scaffold_correction_term needs one control tensor per model parameter",
            "build the control variates from model.parameters()",
        )
    if not model_params:
        return torch.zeros(())
    total = torch.zeros((), dtype=model_params[0].dtype, device=model_params[0].device)
    for w, c, ci in zip(model_params, c_global, c_local, strict=True):
        total = total + (w * (c.detach() - ci.detach())).sum()
    return total


def fedpac_alignment_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    global_protos: torch.Tensor,
    global_present: torch.Tensor,
    local_protos: torch.Tensor,
) -> torch.Tensor:
    """FedPAC's feature-alignment regulariser (Xu et al., ICLR 2023), as the official FedLD repo computes it
    (``methods/fedpac.py``, ``local_training``): ``MSE(z, c)`` where ``z`` is the batch's representation
    (B x d) and row b of ``c`` is the **global** prototype of class ``y_b`` when the server has one
    (``global_present[y_b]``), else the client's own prototype of that class computed before local training.

    The mean is over all B·d entries (``nn.MSELoss()``); the targets are constants (detached). The caller
    adds ``λ · loss`` (λ = 1 in the official code, ``--lam``).
    """
    if features.ndim != 2 or labels.shape[0] != features.shape[0]:
        raise UserError(
            f"fedpac_alignment_loss needs (B, d) features and B labels, got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}",
            "pass the model's representation (model.features(x)) and the batch labels",
        )
    y = labels.long()
    present = global_present.to(torch.bool)[y].unsqueeze(1)
    target = torch.where(present, global_protos[y], local_protos[y]).to(features.dtype).detach()
    return F.mse_loss(features, target)
