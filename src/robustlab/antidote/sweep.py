"""The robustness sweep of the paper's section 5.1: every method across fine-tuning learning rates (at the
default epochs) and across epochs (at the default learning rate), resumable per cell.

Each method is ``align+finetune+post`` (:mod:`robustlab.antidote.methods`). Per seed the sweep aligns the
unaligned model once per alignment method, fine-tunes once per (alignment, fine-tuning method, lr, epochs)
cell, applies every post-fine-tuning defence to that fine-tuned model, and evaluates every point with the same
measures: harmful score per judge, task accuracy, and the likelihood measures on held-out harmful pairs (NLL of
the harmful answer, NLL of a refusal, refusal-preference rate).

Two harnesses (:mod:`robustlab.antidote.sweep_harness`):

- :func:`tiny_harness`: the offline demo model (:mod:`robustlab.antidote.tiny`: a tiny Llama pretrained from
  scratch on the staged data, aligned with refusals, attacked with AG News + harmful pairs through a LoRA
  adapter). Its generations are too weak for content judges, so read the likelihood measures first.
- :func:`pipeline_harness`: a real model from a pipeline config (``base:``, data, stage settings, judges).

Run folder::

    <out>/config.yaml env.json metrics.jsonl summary.json cells/   one JSON per (seed, method, lr, epochs)
    <out>/models/seed<k>/aligned-<method>/                         aligned models (reused by every cell)
    <out>/models/seed<k>/ft-<align>-<finetune>-lr<lr>-ep<ep>/     fine-tuned (deleted unless keep_models)
    <out>/sweep_tables.md  <out>/sweep_lr.png  <out>/sweep_epochs.png
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from robustlab.antidote.methods import (
    DEFAULT_METHODS,
    DefenceParams,
    MethodSpec,
    apply_post,
    parse_method,
    run_stage,
)
from robustlab.errors import UserError


@dataclass
class SweepConfig:
    """What to sweep. ``lrs`` are run at ``default_epochs``; ``epochs`` at ``default_lr`` (the paper: lr
    1e-7..1e-3 at 20 epochs; epochs 1..40 at lr 1e-4)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    lrs: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)
    epochs: tuple[float, ...] = (1, 5, 10, 20, 40)
    default_lr: float = 1e-4
    default_epochs: float = 20
    seeds: tuple[int, ...] = (0,)
    params: DefenceParams = field(default_factory=DefenceParams)
    keep_models: bool = False

    def specs(self) -> list[MethodSpec]:
        specs = [parse_method(m) for m in self.methods]
        if len({s.name for s in specs}) != len(specs):
            raise UserError("a method is listed twice", "list each method once")
        return specs

    def cells(self) -> list[tuple[float, float]]:
        """(lr, epochs) pairs: the lr sweep then the epoch sweep, the shared default cell once and first (so the
        baseline table is complete early in a long run)."""
        out: list[tuple[float, float]] = []
        for c in [(float(lr), float(self.default_epochs)) for lr in self.lrs] + [
            (float(self.default_lr), float(e)) for e in self.epochs
        ]:
            if c not in out:
                out.append(c)
        default = (float(self.default_lr), float(self.default_epochs))
        if default in out:
            out.remove(default)
            out.insert(0, default)
        return out

    def validate(self) -> SweepConfig:
        if not self.methods:
            raise UserError("no methods to sweep", "pass at least one method, e.g. sft,antidote")
        self.specs()
        if not self.lrs and not self.epochs:
            raise UserError("neither learning rates nor epochs to sweep", "pass --lrs and/or --epochs")
        if any(float(x) <= 0 for x in (*self.lrs, *self.epochs, self.default_lr, self.default_epochs)):
            raise UserError("learning rates and epochs must be positive", "fix --lrs / --epochs")
        if not self.seeds:
            raise UserError("no seeds", "pass at least one seed")
        self.params.validate()
        return self


@dataclass
class Harness:
    """Everything one seed of the sweep needs. ``unaligned()`` returns a fresh copy of the model before
    alignment; ``evaluate(model)`` returns the measures of a model."""

    data: Any
    tokenizer: Any
    unaligned: Callable[[], Any]
    align_config: Any
    finetune_config: Any
    evaluate: Callable[[Any], dict]
    align_needed: bool = True


# --------------------------------------------------------------------------- the sweep


def _load_full(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def _tag(x: float) -> str:
    return f"{x:g}"


def _clean(row: dict) -> dict:
    return {k: v for k, v in row.items() if not str(k).startswith(("samples", "answers"))}


def _run_seed(
    cfg: SweepConfig,
    specs: list[MethodSpec],
    cells: list[tuple[float, float]],
    seed: int,
    run: Any,
    out: Path,
    keys: dict,
    ref_keys: dict,
    harness_for: Callable[..., Harness],
    echo: Callable[[str], None],
) -> None:
    """One seed of the sweep: align, fine-tune, apply post-hoc defences, evaluate; finished cells are skipped."""
    from robustlab.antidote.pipeline import save_checkpoint
    from robustlab.runs import seed_everything

    cache = out / "cache"
    seed_everything(seed)
    h = harness_for(seed, cache, run.log)
    models = out / "models" / f"seed{seed}"
    models.mkdir(parents=True, exist_ok=True)
    base = None

    def unaligned() -> Any:
        nonlocal base
        if base is None:
            base = h.unaligned()
        return base

    def aligned(method: str) -> Any:
        folder = models / f"aligned-{method}"
        if not (folder / "config.json").is_file():
            if not h.align_needed and method != "sft":
                raise UserError(
                    f"alignment method {method} needs an alignment stage but align.skip is true",
                    "set align.skip: false or drop alignment-stage methods",
                )
            echo(f"seed {seed}: aligning with {method}")
            t = time.perf_counter()
            model = copy.deepcopy(unaligned())
            if h.align_needed:
                model, res = run_stage(
                    method,
                    model,
                    h.tokenizer,
                    h.data.alignment,
                    h.align_config,
                    h.data,
                    cfg.params,
                )
                if getattr(h.align_config, "mode", "full") == "lora":
                    model = model.merge_and_unload()
                run.log(
                    stage="align",
                    seed=seed,
                    method=method,
                    steps=res.steps,
                    loss_last=res.losses[-1],
                    seconds=round(time.perf_counter() - t, 2),
                )
            save_checkpoint(model, None, folder)
        return _load_full(folder)

    for a, key in ref_keys.items():
        if not run.is_done(key):
            row = {"seed": seed, "method": f"aligned-{a}", "stage": "aligned", **h.evaluate(aligned(a))}
            run.save(key, row)
            run.log(**_clean(row))

    for lr, ep in cells:
        groups: dict[tuple[str, str], list[MethodSpec]] = {}
        for s in specs:
            if not run.is_done(keys[(s.name, lr, ep)]):
                groups.setdefault((s.align, s.finetune), []).append(s)
        for (a, f), todo in groups.items():
            folder = models / f"ft-{a}-{f}-lr{_tag(lr)}-ep{_tag(ep)}"
            align_model = aligned(a)
            tcfg = dataclasses.replace(h.finetune_config, lr=lr, epochs=ep)
            if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
                ft_seconds = None
            else:
                echo(f"seed {seed}: fine-tuning {a}+{f} at lr {lr:g}, {ep:g} epochs")
                t = time.perf_counter()
                ft, res = run_stage(
                    f,
                    copy.deepcopy(align_model),
                    h.tokenizer,
                    h.data.finetune,
                    tcfg,
                    h.data,
                    cfg.params,
                )
                ft_seconds = round(time.perf_counter() - t, 2)
                run.log(
                    stage="finetune",
                    seed=seed,
                    align=a,
                    finetune=f,
                    lr=lr,
                    epochs=ep,
                    steps=res.steps,
                    loss_last=res.losses[-1],
                    seconds=ft_seconds,
                )
                save_checkpoint(ft, None, folder)
                del ft
            for s in todo:
                if tcfg.mode == "lora":
                    from peft import PeftModel

                    model = PeftModel.from_pretrained(copy.deepcopy(align_model), str(folder)).eval()
                else:
                    model = _load_full(folder)
                t = time.perf_counter()
                model, info = apply_post(
                    s.post,
                    model,
                    h.tokenizer,
                    aligned=align_model if s.post in ("safelora", "resta") else None,
                    unaligned=unaligned() if s.post in ("safelora", "resta") else None,
                    calibration_texts=[e.text for e in h.data.realign],
                    params=cfg.params,
                    seed=seed,
                )
                post_seconds = round(time.perf_counter() - t, 3)
                row = {
                    "seed": seed,
                    "method": s.name,
                    "label": s.label,
                    "align": s.align,
                    "finetune": s.finetune,
                    "post": s.post,
                    "lr": lr,
                    "epochs": ep,
                    "finetune_seconds": ft_seconds,
                    "post_seconds": post_seconds,
                    **info,
                    **h.evaluate(model),
                }
                run.save(keys[(s.name, lr, ep)], row)
                run.log(**_clean(row))
                del model
            if not cfg.keep_models and folder.exists():
                shutil.rmtree(folder)


def run_sweep(
    cfg: SweepConfig,
    out: str | Path,
    harness_for: Callable[[int, Path, Callable[..., None]], Harness],
    config_record: dict | None = None,
    echo: Callable[[str], None] = lambda _s: None,
) -> dict[str, Any]:
    """Run (or resume) the sweep into ``out``. ``harness_for(seed, cache, log)`` builds one seed's harness.
    Returns ``{"rows", "aggregate", "tables", ...}`` (also written to ``summary.json`` and ``sweep_tables.md``)."""
    from robustlab.runs import RunDir, cell_key

    cfg.validate()
    specs = cfg.specs()
    out = Path(out)
    settings = {
        k: v for k, v in asdict(cfg).items() if k not in ("methods", "lrs", "epochs", "seeds", "keep_models")
    }
    # the grid (methods, lrs, epochs, seeds) may grow between runs: cells are keyed by it; the settings may not
    record = {"sweep_settings": settings, "grid": asdict(cfg), **(config_record or {})}
    run = RunDir.open(out, record, seed=cfg.seeds[0], resume_keys=["sweep_settings", *(config_record or {})])
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    start = time.perf_counter()
    cells = cfg.cells()
    for seed in cfg.seeds:
        keys = {
            (s.name, lr, ep): cell_key(seed=seed, method=s.name, lr=lr, epochs=ep)
            for s in specs
            for lr, ep in cells
        }
        ref_keys = {
            a: cell_key(seed=seed, method=f"aligned-{a}") for a in dict.fromkeys(s.align for s in specs)
        }
        if all(run.is_done(k) for k in [*keys.values(), *ref_keys.values()]):
            continue
        _run_seed(cfg, specs, cells, seed, run, out, keys, ref_keys, harness_for, echo)

    rows = [
        run.load(cell_key(seed=seed, method=s.name, lr=lr, epochs=ep))
        for seed in cfg.seeds
        for s in specs
        for lr, ep in cells
    ]
    refs = [
        run.load(cell_key(seed=seed, method=f"aligned-{a}"))
        for seed in cfg.seeds
        for a in dict.fromkeys(s.align for s in specs)
    ]
    from robustlab.antidote.sweep_report import aggregate, sweep_plots, sweep_tables

    agg = aggregate(rows + refs)
    tables = sweep_tables(agg, cfg)
    (out / "sweep_tables.md").write_text(tables, encoding="utf-8")
    figs = sweep_plots(agg, cfg, out)
    summary = {
        "aggregate": agg,
        "tables": tables,
        "figures": [str(p) for p in figs],
        "seeds": list(cfg.seeds),
        "seconds": round(time.perf_counter() - start, 1),
    }
    run.write_summary(summary)
    return {"rows": rows, "references": refs, **summary}
