"""RESTA (Bhardwaj et al., ACL 2024): restoring safety through task arithmetic. Post-fine-tuning.

The safety vector is ``V = θ_aligned - θ_unaligned`` (here: the alignment stage's update, aligned model minus
the model before alignment). RESTA adds it back to the fine-tuned model. Before the addition the fine-tuning
delta is pruned with DARE (drop-and-rescale, Yu et al. 2024): every entry of ``Δ = θ_ft - θ_aligned`` is dropped
with probability ``p`` and the survivors are divided by ``1 - p``, so ``E[DARE(Δ)] = Δ``::

    θ_resta = θ_aligned + DARE_p(θ_ft - θ_aligned) + β · V

[R] Defaults ``β = 1`` (plain task-vector addition) and ``p = 0.3`` could not be checked against the RESTA
code; both are settings (``scale``, ``drop_rate``). ``drop_rate=0`` gives RESTA without DARE.

With a LoRA fine-tuning adapter the adapter is merged first (``Δ`` is then ``s·B A`` on the adapted layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from robustlab.errors import UserError

SCALE = 1.0
DROP_RATE = 0.3


def dare(delta: torch.Tensor, drop_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop each entry with probability ``drop_rate`` and rescale the rest by ``1/(1 - drop_rate)``."""
    if not 0.0 <= drop_rate < 1.0:
        raise UserError(f"DARE drop rate must lie in [0, 1), got {drop_rate}", "use e.g. 0.3")
    if drop_rate == 0.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator) >= drop_rate
    return delta * keep.to(delta.device, delta.dtype) / (1.0 - drop_rate)


@dataclass
class RestaReport:
    parameters: int
    changed: int
    dropped: int
    scale: float
    drop_rate: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def resta(
    model: nn.Module,
    aligned: nn.Module | dict[str, torch.Tensor],
    unaligned: nn.Module | dict[str, torch.Tensor],
    scale: float = SCALE,
    drop_rate: float = DROP_RATE,
    seed: int = 0,
) -> tuple[nn.Module, RestaReport]:
    """RESTA on ``model`` (a full model, or a peft model whose adapter is merged first). Returns the (plain)
    re-aligned model, changed in place, and a report. Parameters are matched by name; every floating
    parameter present in all three is updated."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    wa = aligned.state_dict() if isinstance(aligned, nn.Module) else aligned
    wu = unaligned.state_dict() if isinstance(unaligned, nn.Module) else unaligned
    gen = torch.Generator().manual_seed(int(seed))
    params = changed = dropped = 0
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if id(p) in seen or name not in wa or name not in wu or not p.is_floating_point():
                continue
            seen.add(id(p))  # tied weights are updated once
            a, u = wa[name].to(p.device, torch.float64), wu[name].to(p.device, torch.float64)
            delta = p.double() - a
            pruned = dare(delta, drop_rate, gen)
            dropped += int(((pruned == 0) & (delta != 0)).sum())
            new = a + pruned + scale * (a - u)
            changed += int((new != p.double()).sum())
            params += p.numel()
            p.copy_(new.to(p.dtype))
    if params == 0:
        raise UserError(
            "RESTA matched no parameter by name", "pass the aligned and unaligned models of this model"
        )
    return model, RestaReport(params, changed, dropped, scale, drop_rate)
