"""Antidote's comparison set as configurable pipeline stages: a *method* is an alignment-stage defence, a
fine-tuning-stage defence and a post-fine-tuning defence, chained.

Method strings (the pipeline's ``method:`` key and the sweep's ``--methods``):

- a single name places itself in its stage: ``sft`` (no defence), ``vaccine`` / ``repnoise`` / ``booster``
  (alignment), ``lisa`` / ``ldifs`` (fine-tuning), ``antidote`` / ``safelora`` / ``resta`` / ``random`` /
  ``magnitude`` (post-fine-tuning);
- a combination joins them with ``+`` in stage order, e.g. ``vaccine+sft+antidote`` (the paper's V-S-A),
  ``vaccine+lisa+antidote`` (V-L-A), ``sft+lisa+antidote``.

The hyper-parameters default to the papers' (:class:`DefenceParams`); :func:`auxiliary_data` supplies the extra
data some defences need, built from the pipeline's disjoint slices (:class:`HarmfulFinetuningData`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from robustlab.antidote.defences import ALIGNMENT_METHODS, FINETUNE_METHODS, POST_METHODS, stage_function
from robustlab.errors import UserError

#: Display names of the single methods (the paper's spelling).
LABELS = {
    "sft": "SFT",
    "vaccine": "Vaccine",
    "repnoise": "RepNoise",
    "booster": "Booster",
    "lisa": "Lisa",
    "ldifs": "LDIFS",
    "antidote": "Antidote",
    "safelora": "SafeLoRA",
    "resta": "RESTA",
    "random": "random pruning",
    "magnitude": "magnitude pruning",
}
#: The paper's comparison (section 5.1) plus Booster, SafeLoRA, RESTA, the V-S-A combination and the
#: paper's two pruning controls at Antidote's ratio (random and magnitude pruning of the same weights).
DEFAULT_METHODS = (
    "sft",
    "repnoise",
    "vaccine",
    "booster",
    "lisa",
    "ldifs",
    "safelora",
    "resta",
    "antidote",
    "vaccine+sft+antidote",
    "random",
    "magnitude",
)


@dataclass(frozen=True)
class MethodSpec:
    align: str = "sft"
    finetune: str = "sft"
    post: str = "none"

    @property
    def name(self) -> str:
        """The canonical string: a single name when only one stage is defended, else ``a+f+p``."""
        parts = [p for p in (self.align, self.finetune) if p != "sft"]
        if self.post != "none":
            parts.append(self.post)
        if len(parts) <= 1:
            return parts[0] if parts else "sft"
        post = [] if self.post == "none" else [self.post]
        return "+".join([self.align, self.finetune, *post])

    @property
    def label(self) -> str:
        if self.name in LABELS:
            return LABELS[self.name]
        letters = {"sft": "S", "vaccine": "V", "repnoise": "R", "booster": "B", "lisa": "L", "ldifs": "D"}
        post = {"antidote": "A", "safelora": "SL", "resta": "RT", "random": "rand", "magnitude": "mag"}
        out = [letters[self.align], letters[self.finetune]]
        if self.post != "none":
            out.append(post[self.post])
        return "-".join(out)


def parse_method(text: str) -> MethodSpec:
    """``"vaccine"`` -> ``MethodSpec(align="vaccine")``; ``"vaccine+sft+antidote"`` -> all three stages.
    Unknown names or names in the wrong stage raise :class:`UserError`."""
    parts = [p.strip().lower() for p in str(text).split("+") if p.strip()]
    allowed = ", ".join(dict.fromkeys([*ALIGNMENT_METHODS, *FINETUNE_METHODS, *POST_METHODS[1:]]))
    if not parts:
        raise UserError("empty method", f"use one of {allowed}, or a combination like vaccine+sft+antidote")
    if len(parts) == 1:
        p = parts[0]
        if p in ALIGNMENT_METHODS:
            return MethodSpec(align=p)
        if p in FINETUNE_METHODS:
            return MethodSpec(finetune=p)
        if p in POST_METHODS and p != "none":
            return MethodSpec(post=p)
        raise UserError(f"unknown method {text!r}", f"use one of {allowed}")
    if len(parts) not in (2, 3):
        raise UserError(
            f"method {text!r} has {len(parts)} parts", "use align+finetune[+post], e.g. vaccine+sft+antidote"
        )
    align, finetune = parts[0], parts[1]
    post = parts[2] if len(parts) == 3 else "none"
    if align not in ALIGNMENT_METHODS:
        raise UserError(
            f"{align!r} is not an alignment-stage method", f"use one of {', '.join(ALIGNMENT_METHODS)}"
        )
    if finetune not in FINETUNE_METHODS:
        raise UserError(
            f"{finetune!r} is not a fine-tuning-stage method", f"use one of {', '.join(FINETUNE_METHODS)}"
        )
    if post not in POST_METHODS:
        raise UserError(f"{post!r} is not a post-fine-tuning method", f"use one of {', '.join(POST_METHODS)}")
    return MethodSpec(align, finetune, post)


@dataclass
class DefenceParams:
    """Every defence's hyper-parameters; defaults are the papers' / official scripts' (``papers/antidote.md``
    §1.5, §6), except where noted."""

    vaccine_rho: float = 2.0
    repnoise_alpha: float = 0.1
    repnoise_beta: float = 0.001
    booster_lambda: float = 5.0
    booster_alpha: float = 0.1
    lisa_rho: float = 1.0
    lisa_alignment_steps: int = 100
    lisa_finetune_steps: int = 900
    ldifs_rho: float = 1e-4
    antidote_ratio: float = 0.1  # SST-2 default α (0.05 for GSM8K / AG News)
    antidote_batch_size: int = 8
    antidote_max_length: int = 2048
    safelora_threshold: float = 0.5
    resta_scale: float = 1.0  # [R]
    resta_drop_rate: float = 0.3  # [R]

    def validate(self) -> DefenceParams:
        from robustlab.antidote.realign import validate_mask_ratio

        validate_mask_ratio(self.antidote_ratio)
        if self.vaccine_rho < 0 or self.lisa_rho < 0 or self.ldifs_rho < 0:
            raise UserError("defence strengths (rho) must be >= 0", "fix the defence settings")
        if self.lisa_alignment_steps <= 0 or self.lisa_finetune_steps <= 0:
            raise UserError("Lisa's step counts must be positive", "use e.g. 100 and 900")
        if not 0 <= self.resta_drop_rate < 1:
            raise UserError(f"RESTA drop rate {self.resta_drop_rate} is outside [0, 1)", "use e.g. 0.3")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def harmful_pairs(data: Any) -> list[Any]:
    """Harmful prompt -> harmful answer pairs for RepNoise and Booster: ``data.harmful_aux``, drawn from the
    harmful pool disjoint from the attack, re-alignment, held-out and evaluation slices, and *truly harmful*,
    unlike the official RepNoise script's mostly-SST-2 batches."""
    if not data.harmful_aux:
        raise UserError(
            "RepNoise/Booster need harmful pairs but the data has no auxiliary harmful slice",
            "raise data.n_align (the auxiliary slice has up to n_align pairs)",
        )
    return list(data.harmful_aux)


def auxiliary_data(method: str, data: Any, data_dir: Any = None) -> dict[str, Any]:
    """The keyword data a training-stage method needs: ``harmful`` pairs (RepNoise, Booster) or the ``guide``
    alignment set (Lisa)."""
    if method in ("repnoise", "booster"):
        return {"harmful": harmful_pairs(data)}
    if method == "lisa":
        return {"guide": list(data.alignment)}
    return {}


def stage_kwargs(method: str, params: DefenceParams) -> dict[str, Any]:
    """The hyper-parameter keywords of a training-stage method."""
    p = params
    return {
        "sft": {},
        "vaccine": {"rho": p.vaccine_rho},
        "repnoise": {"alpha": p.repnoise_alpha, "beta": p.repnoise_beta},
        "booster": {"lam": p.booster_lambda, "alpha": p.booster_alpha},
        "lisa": {
            "rho": p.lisa_rho,
            "alignment_steps": p.lisa_alignment_steps,
            "finetune_steps": p.lisa_finetune_steps,
        },
        "ldifs": {"rho": p.ldifs_rho},
    }[method]


def run_stage(
    method: str,
    model: Any,
    tokenizer: Any,
    examples: Any,
    config: Any,
    data: Any,
    params: DefenceParams,
    data_dir: Any = None,
    log: Any = None,
) -> tuple[Any, Any]:
    """Train one stage (alignment or fine-tuning) with ``method``; returns ``(model, TrainResult)``."""
    fn = stage_function(method)
    kwargs = {**auxiliary_data(method, data, data_dir), **stage_kwargs(method, params)}
    if log is not None:
        kwargs["log"] = log
    return fn(model, tokenizer, examples, config, **kwargs)


def apply_post(
    method: str,
    model: Any,
    tokenizer: Any,
    *,
    aligned: Any = None,
    unaligned: Any = None,
    calibration_texts: Any = None,
    params: DefenceParams | None = None,
    seed: int = 0,
) -> tuple[Any, dict]:
    """Apply a post-fine-tuning defence to ``model`` (changed in place where possible); returns
    ``(model, info)``. Antidote and the pruning controls prune the LoRA adapter (or every decoder linear layer
    of a fully fine-tuned model) at ``params.antidote_ratio``; SafeLoRA and RESTA need the ``aligned`` and
    ``unaligned`` (before alignment) models."""
    params = params or DefenceParams()
    if method == "none":
        return model, {}
    if method in ("antidote", "random", "magnitude"):
        from robustlab.antidote.realign import calibration_batches, realign

        batches = None
        if method == "antidote":
            if not calibration_texts:
                raise UserError(
                    "Antidote needs a re-alignment (calibration) set", "pass harmful calibration texts"
                )
            batches = calibration_batches(
                tokenizer, list(calibration_texts), params.antidote_batch_size, params.antidote_max_length
            )
        scoring = "wanda" if method == "antidote" else method
        res = realign(model, batches, params.antidote_ratio, method=scoring, seed=seed)
        return model, {"zeroed": res.total_zeroed, "ratio": params.antidote_ratio}
    if aligned is None or unaligned is None:
        raise UserError(f"{method} needs the aligned and the unaligned (pre-alignment) model", "pass both")
    if method == "safelora":
        from robustlab.antidote.defences.safelora import safelora

        rep = safelora(model, aligned, unaligned, threshold=params.safelora_threshold)
        return model, {"safelora_projected": len(rep.projected), "safelora_layers": len(rep.cosines)}
    if method == "resta":
        from robustlab.antidote.defences.resta import resta

        model, rep = resta(model, aligned, unaligned, params.resta_scale, params.resta_drop_rate, seed)
        return model, {"resta_dropped": rep.dropped}
    raise UserError(f"unknown post-fine-tuning method {method!r}", f"use one of {', '.join(POST_METHODS)}")
