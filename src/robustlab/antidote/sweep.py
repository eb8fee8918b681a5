"""The robustness sweep of the paper's section 5.1: every method across fine-tuning learning rates (at the
default epochs) and across epochs (at the default learning rate), resumable per cell.

Each method is ``align+finetune+post`` (:mod:`robustlab.antidote.baselines`). Per seed the sweep aligns the
unaligned model once per alignment method, fine-tunes once per (alignment, fine-tuning method, lr, epochs)
cell, applies every post-fine-tuning defence to that fine-tuned model, and evaluates every point with the same
measures: harmful score per judge, task accuracy, and the likelihood measures on held-out harmful pairs (NLL of
the harmful answer, NLL of a refusal, refusal-preference rate).

Two harnesses:

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from robustlab.antidote.baselines import (
    DEFAULT_METHODS,
    DefenceParams,
    MethodSpec,
    apply_post,
    parse_method,
    run_stage,
)
from robustlab.errors import UserError

MEASURES = (
    "hs_refusal",
    "fa",
    "fa_likelihood",
    "nll_harmful",
    "nll_refusal",
    "refusal_preference",
    "refusal_preference_start",
)


def label_likelihood_accuracy(
    model: Any, tokenizer: Any, task: str, examples: Sequence[Any], max_length: int, batch_size: int = 32
) -> float | None:
    """Task accuracy read from likelihoods, not generations: the share of examples whose gold label is the
    most likely (lowest NLL per token, label + EOS) of the task's labels. For the tiny model, whose greedy
    outputs rarely form an exact label, this is the task measure that can move; it is ``None`` for tasks
    without a closed label set (GSM8K, Alpaca)."""
    from robustlab.antidote.data import AGNEWS_LABELS, SST2_LABELS
    from robustlab.antidote.evaluate import answer_nll

    labels = {"agnews": AGNEWS_LABELS, "sst2": SST2_LABELS}.get(task)
    if labels is None or not examples:
        return None
    prompts = [e.prompt for e in examples]
    nll = [
        answer_nll(model, tokenizer, prompts, [lab] * len(prompts), max_length, batch_size) for lab in labels
    ]
    correct = 0
    for i, e in enumerate(examples):
        best = min(range(len(labels)), key=lambda k: nll[k][i])
        correct += labels[best] == e.label
    return 100.0 * correct / len(examples)


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
    data_dir: Any = None
    align_needed: bool = True


# --------------------------------------------------------------------------- harnesses


def tiny_sweep_config(scale: str = "quick") -> tuple[SweepConfig, Any]:
    """The sweep settings on the offline tiny model, and the demo config it builds on: a smaller model (hidden
    64, 2 layers, 1024-token vocabulary) and smaller slices than the demo, so that 5 cells x 10 methods
    (6 fine-tuning runs and 10 evaluations per cell) fit in well under an hour on 2 shared cores.

    The lr grid brackets the demo's LoRA attack lr (5e-3): a tiny from-scratch model needs learning rates far
    above a 7B model's to be moved, so the paper's 1e-7..1e-3 would all be "no attack" here. Lisa's
    100/900-step states are scaled to 2/18 steps (the same 10%/90% split, several switches per run), because
    the tiny runs are only 19-114 steps long."""
    from robustlab.antidote.tiny import TinyModelConfig, demo_config

    if scale not in ("quick", "smoke"):
        raise UserError(f"unknown sweep scale {scale!r}", "use quick (or smoke for a seconds-long check)")
    demo = demo_config("smoke" if scale == "smoke" else "quick")
    if scale == "quick":
        demo = dataclasses.replace(
            demo,
            model=TinyModelConfig(
                vocab_size=1024,
                hidden_size=64,
                num_layers=2,
                num_heads=4,
                intermediate_size=192,
                max_position=96,
            ),
            max_length=64,
            n_finetune=300,
            n_realign=100,
            n_heldout=100,
            n_eval_harmful=100,
            n_eval_task=100,
            n_align_refusal=400,
            n_align_alpaca=200,
            n_pretrain_docs=2000,
            seeds=(0,),
            # more passes than the demo: the smaller model needs them to refuse reliably after alignment
            pretrain=dataclasses.replace(demo.pretrain, epochs=2),
            align=dataclasses.replace(demo.align, epochs=4),
        )
        params = DefenceParams(lisa_alignment_steps=2, lisa_finetune_steps=18, antidote_ratio=0.1)
        cfg = SweepConfig(
            lrs=(1e-3, 5e-3, 2e-2),
            epochs=(1, 3, 6),
            default_lr=5e-3,
            default_epochs=3,
            seeds=(0,),
            params=params,
        )
    else:
        params = DefenceParams(
            lisa_alignment_steps=1, lisa_finetune_steps=2, antidote_ratio=0.1, antidote_batch_size=4
        )
        cfg = SweepConfig(
            methods=(
                "sft",
                "vaccine+sft+antidote",
                "lisa",
                "ldifs",
                "safelora",
                "resta",
                "booster",
                "repnoise",
            ),
            lrs=(5e-3,),
            epochs=(1, 2),
            default_lr=5e-3,
            default_epochs=1,
            seeds=(0,),
            params=params,
        )
    return cfg, demo


def tiny_harness(demo: Any, seed: int, cache: Path, data_dir: Any = None, log: Any = None) -> Harness:
    """The offline harness: the demo's data slices and pretrained tiny base (cached in ``cache``), full-SFT
    alignment with the demo's settings, LoRA fine-tuning with the demo's attack settings."""
    from robustlab.antidote.evaluate import EvalSettings, evaluate_model
    from robustlab.antidote.judges import RefusalJudge
    from robustlab.antidote.tiny import _load_or_build_base, _train_cfg, demo_data

    data, docs = demo_data(demo, seed, data_dir)
    base, tokenizer = _load_or_build_base(demo, seed, docs, data, cache, log or (lambda **_: None))
    # prompts as long as training saw them (encode_example keeps at most 3/4 of max_length for the prompt)
    settings = EvalSettings(
        demo.max_new_tokens_harmful, demo.max_new_tokens_task, 32, (3 * demo.max_length) // 4, demo.max_length
    )
    judges = {"refusal": RefusalJudge()}

    def evaluate(model: Any) -> dict:
        m = evaluate_model(
            model,
            tokenizer,
            demo.task,
            data.eval_harmful,
            data.eval_task,
            data.heldout_harmful,
            judges,
            settings,
            keep_outputs=3,
        )
        m["fa_likelihood"] = label_likelihood_accuracy(
            model, tokenizer, demo.task, data.eval_task, demo.max_length
        )
        return m

    return Harness(
        data=data,
        tokenizer=tokenizer,
        unaligned=lambda: copy.deepcopy(base),
        align_config=_train_cfg(demo.align, seed, demo.max_length),
        finetune_config=_train_cfg(demo.attack_lora, seed, demo.max_length),
        evaluate=evaluate,
        data_dir=data_dir,
    )


def pipeline_harness(cfg: Any, seed: int, cache: Path) -> Harness:
    """A real model from a :class:`robustlab.antidote.pipeline.PipelineConfig`: its base, data slices, stage
    settings and judges. ``align.skip: true`` treats the base as already aligned (then alignment-stage
    defences cannot run)."""
    from robustlab.antidote.evaluate import EvalSettings, evaluate_model
    from robustlab.antidote.models import load_model
    from robustlab.antidote.pipeline import make_judges, pipeline_data

    d = cfg.data
    data = pipeline_data(cfg, seed)
    _, tokenizer = load_model(cfg.base, trust_remote_code=cfg.trust_remote_code)
    judges = make_judges(cfg.evaluate.judges, d.data_dir, cache, seed, cfg.evaluate.judge_model)
    ev = cfg.evaluate
    settings = EvalSettings(
        ev.max_new_tokens_harmful, ev.max_new_tokens_task, ev.batch_size, ev.max_prompt, ev.max_length
    )

    def evaluate(model: Any) -> dict:
        m = evaluate_model(
            model,
            tokenizer,
            d.task,
            data.eval_harmful,
            data.eval_task,
            data.heldout_harmful,
            judges,
            settings,
            keep_outputs=3,
        )
        m["fa_likelihood"] = label_likelihood_accuracy(
            model, tokenizer, d.task, data.eval_task, ev.max_length, ev.batch_size
        )
        return m

    return Harness(
        data=data,
        tokenizer=tokenizer,
        unaligned=lambda: load_model(cfg.base, trust_remote_code=cfg.trust_remote_code)[0],
        align_config=dataclasses.replace(cfg.align.train, seed=seed),
        finetune_config=dataclasses.replace(cfg.finetune.train, seed=seed),
        evaluate=evaluate,
        data_dir=d.data_dir,
        align_needed=not cfg.align.skip,
    )


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
                    h.data_dir,
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
                    h.data_dir,
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


# --------------------------------------------------------------------------- aggregation and tables


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Mean and 95% t-interval half-width over seeds of every measure, per (method, lr, epochs)."""
    from robustlab.antidote.tiny import mean_ci

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("lr"), r.get("epochs")), []).append(r)
    out = []
    for (method, lr, ep), rs in groups.items():
        row: dict[str, Any] = {
            "method": method,
            "label": rs[0].get("label", method),
            "lr": lr,
            "epochs": ep,
            "seeds": len(rs),
        }
        for m in sorted({k for r in rs for k in r if k.startswith("hs_")} | set(MEASURES)):
            if any(r.get(m) is not None for r in rs):
                row[m], row[m + "_ci"] = mean_ci([r.get(m) for r in rs])
        out.append(row)
    return out


def _fmt(row: dict | None, m: str, digits: int) -> str:
    if row is None or m not in row or row[m] != row[m]:
        return "—"
    if row.get("seeds", 1) > 1:
        return f"{row[m]:.{digits}f} ± {row[m + '_ci']:.{digits}f}"
    return f"{row[m]:.{digits}f}"


TABLE_MEASURES = (
    ("refusal_preference_start", "refusal preference % over the first 3 answer tokens (↑)", 1),
    ("refusal_preference", "refusal preference % over whole answers (↑)", 1),
    ("nll_harmful", "NLL of the held-out harmful answer (↑)", 2),
    ("hs_refusal", "harmful score %, refusal judge (↓)", 1),
    ("fa", "task accuracy %, exact match of the greedy answer (↑)", 1),
    ("fa_likelihood", "task accuracy %, most likely label (↑)", 1),
    ("nll_refusal", "NLL of a refusal (↓)", 2),
)


def sweep_table(agg: Sequence[dict], cfg: SweepConfig, axis: str, measure: str, digits: int) -> str:
    """One measure across the lr (``axis="lr"``) or epoch sweep: a row per method, a column per value and
    the average over the values."""
    from robustlab.report import markdown_table

    values = [float(v) for v in (cfg.lrs if axis == "lr" else cfg.epochs)]
    fixed = ("epochs", float(cfg.default_epochs)) if axis == "lr" else ("lr", float(cfg.default_lr))
    head = [f"lr {v:g}" for v in values] if axis == "lr" else [f"{v:g} ep" for v in values]
    body = []
    for s in cfg.specs():
        cells = []
        means = []
        for v in values:
            r = next(
                (
                    x
                    for x in agg
                    if x["method"] == s.name and x.get(axis) == v and x.get(fixed[0]) == fixed[1]
                ),
                None,
            )
            cells.append(_fmt(r, measure, digits))
            if r is not None and r.get(measure) is not None and r[measure] == r[measure]:
                means.append(r[measure])
        avg = f"{sum(means) / len(means):.{digits}f}" if len(means) == len(values) else "—"
        body.append([s.label, *cells, avg])
    return markdown_table(["method", *head, "avg"], body)


def baseline_table(agg: Sequence[dict], cfg: SweepConfig) -> str:
    """Every method at the default cell (default lr and epochs), and the aligned models before fine-tuning."""
    from robustlab.report import markdown_table

    hs = sorted({k for r in agg for k in r if k.startswith("hs_") and not k.endswith("_ci")})
    cols = [
        "method",
        *[f"HS {k[3:]} % ↓" for k in hs],
        "task acc % ↑",
        "task acc (likelihood) % ↑",
        "NLL harmful ↑",
        "NLL refusal ↓",
        "refusal pref. % (whole) ↑",
        "refusal pref. % (first 3 tokens) ↑",
    ]

    def row(label: str, r: dict | None) -> list[str]:
        return [
            label,
            *[_fmt(r, k, 1) for k in hs],
            _fmt(r, "fa", 1),
            _fmt(r, "fa_likelihood", 1),
            _fmt(r, "nll_harmful", 2),
            _fmt(r, "nll_refusal", 2),
            _fmt(r, "refusal_preference", 1),
            _fmt(r, "refusal_preference_start", 1),
        ]

    body = [
        row(f"aligned only ({r['method'][8:]})", r) for r in agg if str(r["method"]).startswith("aligned-")
    ]
    for s in cfg.specs():
        r = next(
            (
                x
                for x in agg
                if x["method"] == s.name
                and x.get("lr") == float(cfg.default_lr)
                and x.get("epochs") == float(cfg.default_epochs)
            ),
            None,
        )
        body.append(row(s.label, r))
    return markdown_table(cols, body)


def sweep_tables(agg: Sequence[dict], cfg: SweepConfig) -> str:
    parts = [
        f"### Baseline table (lr {cfg.default_lr:g}, {cfg.default_epochs:g} epochs)\n\n{baseline_table(agg, cfg)}"
    ]
    for axis, title in (
        ("lr", f"Learning-rate sweep ({cfg.default_epochs:g} epochs)"),
        ("epochs", f"Epoch sweep (lr {cfg.default_lr:g})"),
    ):
        if not (cfg.lrs if axis == "lr" else cfg.epochs):
            continue
        for m, name, digits in TABLE_MEASURES:
            parts.append(f"### {title}: {name}\n\n{sweep_table(agg, cfg, axis, m, digits)}")
    return "\n\n".join(parts) + "\n"


def sweep_plots(agg: Sequence[dict], cfg: SweepConfig, out: Path) -> list[Path]:
    """NLL of a refusal, harmful score and task accuracy (most likely label when measured, else exact match)
    against lr and against epochs, one line per method."""
    from robustlab.report import pyplot, save_figure

    plt = pyplot()
    paths = []
    fa = "fa_likelihood" if any(r.get("fa_likelihood") is not None for r in agg) else "fa"
    panels = (
        ("nll_refusal", "NLL of a refusal (↓)"),
        ("hs_refusal", "harmful score %, refusal judge (↓)"),
        (fa, "task accuracy %" + (", most likely label" if fa == "fa_likelihood" else "") + " (↑)"),
    )
    for axis, values, fixed, name in (
        ("lr", cfg.lrs, ("epochs", float(cfg.default_epochs)), "sweep_lr.png"),
        ("epochs", cfg.epochs, ("lr", float(cfg.default_lr)), "sweep_epochs.png"),
    ):
        if not values:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
        for s in cfg.specs():
            pts = sorted(
                (
                    r
                    for r in agg
                    if r["method"] == s.name
                    and r.get(fixed[0]) == fixed[1]
                    and r.get(axis) in [float(v) for v in values]
                ),
                key=lambda r: r[axis],
            )
            for ax, (m, _) in zip(axes, panels, strict=True):
                ax.plot([p[axis] for p in pts], [p.get(m) for p in pts], marker="o", label=s.label)
        for ax, (_, label) in zip(axes, panels, strict=True):
            ax.set_xlabel("fine-tuning learning rate" if axis == "lr" else "fine-tuning epochs")
            ax.set_ylabel(label)
            if axis == "lr":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        paths.append(save_figure(fig, out / name))
    return paths
