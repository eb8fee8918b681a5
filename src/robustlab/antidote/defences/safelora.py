"""SafeLoRA (Hsu et al., NeurIPS 2024): project the fine-tuning update onto the safety-aligned subspace, layer
by layer, where the update strays from it. Post-fine-tuning.

As the official code (``IBM/SafeLoRA`` ``model.py``) does it, for every target layer ``i``:

1. the alignment matrix ``V_i = W_aligned,i - W_unaligned,i`` and its projection ``C_i = V_i V_iᵀ / ‖V_i‖_F``;
2. for a LoRA update ``ΔW_i = B_i A_i`` the projected update is ``C_i B_i A_i``; the layer is projected
   (``B_i <- C_i B_i``) when ``cos(C_i ΔW_i, ΔW_i) <= threshold`` (default 0.5), i.e. only where the update
   has drifted away from the safety subspace. ``select="number"`` projects the ``num_layers`` layers with the
   lowest similarity instead (the official ``select_layers_type="number"``, 10 layers).

With full fine-tuning the update is ``ΔW_i = W_ft,i - W_aligned,i`` and a projected layer becomes
``W_aligned,i + C_i ΔW_i``.

``projection="paper"`` is the published ``C = V Vᵀ / ‖V‖_F``. It is **not idempotent** (``C² = C`` only when
``V`` has a single non-zero singular value equal to 1): the paper calls it a projection, but it scales each
left-singular direction of ``V`` by ``σ_k² / ‖V‖_F``. ``projection="orthogonal"`` is the exact orthogonal
projection ``U_r U_rᵀ`` onto the span of the top ``rank`` left-singular vectors of ``V`` (idempotent), for
users who want the subspace reading literally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustlab.errors import UserError

THRESHOLD = 0.5
NUM_LAYERS = 10
PROJECTIONS = ("paper", "orthogonal")


def projection_matrix(v: torch.Tensor, kind: str = "paper", rank: int | None = None) -> torch.Tensor:
    """The projection of one layer from its alignment matrix ``v`` (out x in): ``V Vᵀ / ‖V‖_F`` (``paper``)
    or ``U_r U_rᵀ`` (``orthogonal``; ``rank`` defaults to the numerical rank of ``V`` at its own precision)."""
    eps = torch.finfo(v.dtype).eps if v.is_floating_point() else torch.finfo(torch.float64).eps
    v = v.double()
    if kind == "paper":
        norm = torch.linalg.norm(v)
        if float(norm) == 0.0:
            return torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64)
        return v @ v.T / norm
    if kind == "orthogonal":
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        if rank is None:
            tol = s.max() * max(v.shape) * eps if s.numel() else 0.0
            rank = int((s > tol).sum())
        u = u[:, :rank]
        return u @ u.T
    raise UserError(f"unknown SafeLoRA projection {kind!r}", f"choose from {', '.join(PROJECTIONS)}")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    den = float(torch.linalg.norm(a) * torch.linalg.norm(b))
    return float(a @ b) / den if den > 0 else 1.0


@dataclass
class SafeLoRAReport:
    cosines: dict[str, float] = field(default_factory=dict)
    projected: list[str] = field(default_factory=list)
    threshold: float = THRESHOLD
    select: str = "threshold"

    def as_dict(self) -> dict:
        return {
            "cosines": self.cosines,
            "projected": self.projected,
            "n_projected": len(self.projected),
            "n_layers": len(self.cosines),
            "threshold": self.threshold,
            "select": self.select,
        }


def _plain(name: str) -> str:
    """Module name without peft's ``base_model.model.`` prefix."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        _plain(n): m
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "lora_B") and len(getattr(m, "lora_A", {})) > 0
    }


def _weights(state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    return {_plain(k).replace(".base_layer.", "."): v for k, v in sd.items()}


def safelora(
    model: nn.Module,
    aligned: nn.Module | dict[str, torch.Tensor],
    unaligned: nn.Module | dict[str, torch.Tensor],
    threshold: float = THRESHOLD,
    select: str = "threshold",
    num_layers: int = NUM_LAYERS,
    projection: str = "paper",
    rank: int | None = None,
    targets: list[str] | None = None,
) -> SafeLoRAReport:
    """Apply SafeLoRA to ``model`` in place and return which layers were projected.

    ``model`` is a peft LoRA model (the fine-tuning adapter; LoRA B matrices are projected) or a fully
    fine-tuned model (``targets``: module names or suffixes; default every Linear layer whose weight differs
    between ``aligned`` and ``unaligned``). ``aligned`` / ``unaligned`` are models or state dicts with the plain
    (non-peft) parameter names.
    """
    if select not in ("threshold", "number"):
        raise UserError(f"unknown SafeLoRA selection {select!r}", "use threshold or number")
    wa, wu = _weights(aligned), _weights(unaligned)
    lora = _lora_layers(model)
    report = SafeLoRAReport(threshold=threshold, select=select)
    plans: list[tuple[str, float, Any]] = []
    with torch.no_grad():
        if lora:
            for name, layer in lora.items():
                key = f"{name}.weight"
                if key not in wa or key not in wu:
                    raise UserError(
                        f"no aligned/unaligned weight for LoRA layer {name}", "pass the matching models"
                    )
                c = projection_matrix(wa[key] - wu[key], projection, rank)
                for adapter in layer.lora_A:
                    a = layer.lora_A[adapter].weight.double()
                    b = layer.lora_B[adapter].weight.double()
                    cb = c @ b
                    cos = cosine(cb @ a, b @ a)
                    label = f"{name}.{adapter}" if len(layer.lora_A) > 1 else name
                    report.cosines[label] = cos
                    plans.append((label, cos, (layer.lora_B[adapter].weight, cb)))
        else:
            current = dict(model.named_modules())
            for name, module in current.items():
                if not isinstance(module, nn.Linear):
                    continue
                if targets is None and name.rsplit(".", 1)[-1] in ("lm_head", "embed_out"):
                    continue  # the output embedding (often tied to the input embedding) is not a layer update
                if targets is not None and not any(name == t or name.endswith("." + t) for t in targets):
                    continue
                key = f"{_plain(name)}.weight"
                if key not in wa or key not in wu or torch.equal(wa[key], wu[key]):
                    continue
                c = projection_matrix(wa[key] - wu[key], projection, rank)
                delta = module.weight.double() - wa[key].double()
                cd = c @ delta
                cos = cosine(cd, delta)
                report.cosines[name] = cos
                plans.append((name, cos, (module.weight, wa[key].double() + cd)))
        if not plans:
            raise UserError(
                "SafeLoRA found no layer to project", "check that aligned and unaligned weights differ"
            )
        if select == "threshold":
            chosen = [p for p in plans if p[1] <= threshold]
        else:
            chosen = sorted(plans, key=lambda p: p[1])[:num_layers]
        for label, _cos, (param, new) in chosen:
            param.copy_(new.to(param.dtype))
            report.projected.append(label)
    return report
