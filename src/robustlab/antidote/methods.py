"""The one registry of Antidote's comparison set: alignment-stage, fine-tuning-stage and post-fine-tuning
methods (``papers/antidote.md`` §6), how each is run, and method strings that chain them.

:data:`REGISTRY` maps a name to a :class:`Method` (its stages, display label, entry point, the auxiliary
data it trains with and its hyper-parameters from :class:`DefenceParams`). It is read-only: the pipeline,
the sweep and the CLI look methods up here and call :func:`run_stage` / :func:`apply_post`, which bind a
run's data and hyper-parameters explicitly; nothing is registered or swapped at run time.

Method strings (the pipeline's ``method:`` key and the sweep's ``--methods``):

- a single name places itself in its stage: ``sft`` (no defence), ``vaccine`` / ``repnoise`` / ``booster``
  (alignment), ``lisa`` / ``ldifs`` (fine-tuning), ``antidote`` / ``safelora`` / ``resta`` / ``random`` /
  ``magnitude`` (post-fine-tuning);
- a combination joins them with ``+`` in stage order, e.g. ``vaccine+sft+antidote`` (the paper's V-S-A),
  ``vaccine+lisa+antidote`` (V-L-A), ``sft+lisa+antidote``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from robustlab.errors import UserError

STAGES = ("alignment", "finetune", "post")
_STAGE_NAMES = {"alignment": "alignment-stage", "finetune": "fine-tuning-stage", "post": "post-fine-tuning"}


@dataclass(frozen=True)
class Method:
    """A registered method. ``entry``: ``"module:function"`` (relative to ``robustlab.antidote``) of a
    training-stage method, whose signature is ``(model, tokenizer, examples, config, **kwargs) -> (model,
    TrainResult)``; ``data``: the keyword of the auxiliary data it trains with (``harmful`` pairs or the
    ``guide`` alignment set); ``params``: ``(keyword, DefenceParams field)`` pairs."""

    name: str
    stages: tuple[str, ...]
    label: str
    letter: str
    entry: str | None = None
    data: str | None = None
    params: tuple[tuple[str, str], ...] = ()


REGISTRY: Mapping[str, Method] = MappingProxyType(
    {
        m.name: m
        for m in (
            Method("sft", ("alignment", "finetune"), "SFT", "S", "train:train"),
            Method(
                "vaccine",
                ("alignment",),
                "Vaccine",
                "V",
                "defences.vaccine:train_vaccine",
                None,
                (("rho", "vaccine_rho"),),
            ),
            Method(
                "repnoise",
                ("alignment",),
                "RepNoise",
                "R",
                "defences.repnoise:train_repnoise",
                "harmful",
                (("alpha", "repnoise_alpha"), ("beta", "repnoise_beta")),
            ),
            Method(
                "booster",
                ("alignment",),
                "Booster",
                "B",
                "defences.booster:train_booster",
                "harmful",
                (("lam", "booster_lambda"), ("alpha", "booster_alpha")),
            ),
            Method(
                "lisa",
                ("finetune",),
                "Lisa",
                "L",
                "defences.lisa:train_lisa",
                "guide",
                (
                    ("rho", "lisa_rho"),
                    ("alignment_steps", "lisa_alignment_steps"),
                    ("finetune_steps", "lisa_finetune_steps"),
                ),
            ),
            Method(
                "ldifs",
                ("finetune",),
                "LDIFS",
                "D",
                "defences.ldifs:train_ldifs",
                None,
                (("rho", "ldifs_rho"),),
            ),
            Method("none", ("post",), "", ""),
            Method("antidote", ("post",), "Antidote", "A"),
            Method("random", ("post",), "random pruning", "rand"),
            Method("magnitude", ("post",), "magnitude pruning", "mag"),
            Method("safelora", ("post",), "SafeLoRA", "SL"),
            Method("resta", ("post",), "RESTA", "RT"),
        )
    }
)


def names(stage: str) -> tuple[str, ...]:
    """The methods of one stage (``alignment``, ``finetune`` or ``post``), in registry order."""
    return tuple(n for n, m in REGISTRY.items() if stage in m.stages)


def method(name: str, stage: str) -> Method:
    """The registered method ``name`` of ``stage``; :class:`UserError` naming the stage's methods otherwise."""
    m = REGISTRY.get(str(name).strip().lower())
    if m is None or stage not in m.stages:
        kind = "unknown method" if m is None else f"not a {_STAGE_NAMES[stage]} method:"
        raise UserError(f"{kind} {name!r} ({_STAGE_NAMES[stage]})", f"use one of {', '.join(names(stage))}")
    return m


def train_function(name: str) -> Callable[..., Any]:
    """The training function of a training-stage method (``sft`` is the plain loop)."""
    m = REGISTRY.get(name)
    if m is None or m.entry is None:
        raise UserError(
            f"unknown training-stage method {name!r}",
            f"choose from {', '.join(dict.fromkeys([*names('alignment'), *names('finetune')]))}",
        )
    module, function = m.entry.split(":")
    return getattr(importlib.import_module(f"robustlab.antidote.{module}"), function)


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
        """The paper's name of a single method; letters for a combination (``V-S-A``)."""
        if self.name in REGISTRY:
            return REGISTRY[self.name].label
        parts = [self.align, self.finetune] + ([] if self.post == "none" else [self.post])
        return "-".join(REGISTRY[p].letter for p in parts)


def parse_method(text: str) -> MethodSpec:
    """``"vaccine"`` -> ``MethodSpec(align="vaccine")``; ``"vaccine+sft+antidote"`` -> all three stages.
    Unknown names or names in the wrong stage raise :class:`UserError`."""
    parts = [p.strip().lower() for p in str(text).split("+") if p.strip()]
    allowed = ", ".join(n for n in REGISTRY if n != "none")
    if not parts:
        raise UserError("empty method", f"use one of {allowed}, or a combination like vaccine+sft+antidote")
    if len(parts) == 1:
        found = REGISTRY.get(parts[0])
        if found is None or found.name == "none":
            raise UserError(f"unknown method {text!r}", f"use one of {allowed}")
        stage = found.stages[0]
        return MethodSpec(
            **{{"alignment": "align", "finetune": "finetune", "post": "post"}[stage]: found.name}
        )
    if len(parts) not in (2, 3):
        raise UserError(
            f"method {text!r} has {len(parts)} parts", "use align+finetune[+post], e.g. vaccine+sft+antidote"
        )
    align = method(parts[0], "alignment").name
    finetune = method(parts[1], "finetune").name
    post = method(parts[2], "post").name if len(parts) == 3 else "none"
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


def auxiliary_data(name: str, data: Any) -> dict[str, Any]:
    """The keyword data a training-stage method trains with (its registry ``data``): ``harmful`` pairs
    (RepNoise, Booster) or the ``guide`` alignment set (Lisa)."""
    key = REGISTRY[name].data
    if key == "harmful":
        return {"harmful": harmful_pairs(data)}
    if key == "guide":
        return {"guide": list(data.alignment)}
    return {}


def stage_kwargs(name: str, params: DefenceParams) -> dict[str, Any]:
    """The hyper-parameter keywords of a training-stage method, from ``params``."""
    return {keyword: getattr(params, field) for keyword, field in REGISTRY[name].params}


def run_stage(
    method: str,
    model: Any,
    tokenizer: Any,
    examples: Any,
    config: Any,
    data: Any,
    params: DefenceParams,
    log: Any = None,
) -> tuple[Any, Any]:
    """Train one stage (alignment or fine-tuning) with ``method``, bound to this run's ``data`` (for the
    auxiliary data some defences need) and hyper-parameters; returns ``(model, TrainResult)``."""
    fn = train_function(method)
    kwargs = {**auxiliary_data(method, data), **stage_kwargs(method, params)}
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
    raise UserError(f"unknown post-fine-tuning method {method!r}", f"use one of {', '.join(names('post'))}")
