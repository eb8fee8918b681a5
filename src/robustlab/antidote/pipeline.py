"""The harmful fine-tuning pipeline: align -> harmful fine-tune -> re-align (Antidote) -> evaluate.

Every stage writes its result into the run folder and is skipped on a rerun::

    <out>/config.yaml env.json metrics.jsonl summary.json cells/
    <out>/stages/aligned/            the base with the alignment adapter merged (or the fully aligned model)
    <out>/stages/finetuned/          the fine-tuning adapter (LoRA) or the fine-tuned model (full)
    <out>/stages/realigned-<method>-<ratio>/   pruned adapter/model + realign_mask.safetensors + realign.json
    <out>/results.md  <out>/tradeoff.png

The mask-ratio sweep computes the Wanda scores once (on the unpruned fine-tuned model) and derives every
ratio's masks from them. Optional controls at the same ratios: ``random`` pruning and ``benign``
calibration (Wanda on benign rows of the task that are outside the fine-tuning mix).

Stage ``method`` keys name a method of that stage in :data:`robustlab.antidote.methods.REGISTRY` (``sft``,
or an alignment-stage / fine-tuning-stage defence), run with :func:`robustlab.antidote.methods.run_stage`
and the defences' hyper-parameters passed to :func:`run_pipeline`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from robustlab.antidote.data import BENIGN_TASKS
from robustlab.antidote.judges import BEAVERDAM_ID
from robustlab.antidote.methods import DefenceParams, run_stage
from robustlab.antidote.methods import method as registered_method
from robustlab.antidote.train import ALIGN_DEFAULTS, FINETUNE_DEFAULTS, TrainConfig
from robustlab.errors import UserError

JUDGES = ("refusal", "embedding", "minilm-ft", "beaverdam")
REALIGN_METHODS = ("wanda", "magnitude", "random")
CONTROLS = ("random", "benign", "magnitude")


@dataclass
class StageConfig:
    """A training stage: ``method`` (a method of the stage in the registry), ``skip`` and the training
    settings."""

    method: str = "sft"
    skip: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RealignConfig:
    method: str = "wanda"
    mask_ratios: list[float] = field(default_factory=lambda: [0.1])  # the SST-2 default α
    targets: Any = "auto"
    controls: list[str] = field(default_factory=list)
    #: the ratios the controls are evaluated at (``None``: every ratio of ``mask_ratios``)
    control_ratios: list[float] | None = None
    batch_size: int = 8
    max_length: int = 2048
    save_models: bool = True
    #: stop after the fine-tuned model's evaluation (a pilot that chooses settings from the aligned and
    #: attacked models alone)
    skip: bool = False


@dataclass
class EvalConfig:
    judges: list[str] = field(default_factory=lambda: ["refusal"])
    max_new_tokens_harmful: int = 512
    max_new_tokens_task: int = 200
    batch_size: int = 16
    max_prompt: int = 1024
    max_length: int = 1024
    #: the beaver-dam judge: a local folder or hub id (``--judge-model``); default PKU-Alignment/beaver-dam-7b
    judge_model: str | None = None
    #: every answer to the harmful prompts and the task rows is stored in the point's cell (``answers_*``),
    #: so harmful scores can be recomputed later with another judge; false keeps 5 samples
    keep_answers: bool = False
    #: evaluate the controls and the Antidote ratios other than ``primary_ratios`` on the first this many
    #: harmful prompts and task rows only (``None``: all of them); the aligned, fine-tuned and
    #: primary-ratio points always see every prompt and row
    n_eval_harmful_grid: int | None = None
    n_eval_task_grid: int | None = None
    primary_ratios: list[float] = field(default_factory=list)


@dataclass
class DataConfig:
    """Slices (paper defaults: n=5000, p=0.2, 5000 alignment rows, 2000 re-alignment pairs, 1000 prompts)."""

    data_dir: str | None = None
    task: str = "sst2"
    n: int = 5000
    harmful_ratio: float = 0.2
    n_align: int = 5000
    n_realign: int = 2000
    n_heldout: int = 200
    n_eval_harmful: int = 1000
    n_eval_task: int | None = None
    align_with_refusals: bool = False  # the paper aligns on BeaverTails safe pairs; true: templated refusals
    align_with_safe_pairs: bool = True


@dataclass
class PipelineConfig:
    base: str = ""
    trust_remote_code: bool = False
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    align: StageConfig = field(default_factory=lambda: StageConfig(train=dataclasses.replace(ALIGN_DEFAULTS)))
    finetune: StageConfig = field(
        default_factory=lambda: StageConfig(train=dataclasses.replace(FINETUNE_DEFAULTS))
    )
    realign: RealignConfig = field(default_factory=RealignConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- config loading


def _from_dict(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"{where or 'config'} must be a mapping, got {type(values).__name__}", "fix the YAML")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(
            f"unknown config key(s): {', '.join(prefix + k for k in unknown)}",
            f"allowed{' under ' + where if where else ''}: {', '.join(fields)}",
        )
    kwargs = {}
    default = cls()
    for name, value in values.items():
        current = getattr(default, name)
        sub = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(current):
            kwargs[name] = _from_dict(type(current), value, sub)
        elif isinstance(current, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def read_config_file(path: str | Path | None) -> dict:
    """The mapping in a YAML config file (``{}`` for no file); a missing or malformed file is a ``UserError``."""
    import yaml

    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found", "pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML ({exc})", "fix the YAML syntax") from exc
    if not isinstance(values, dict):
        raise UserError(f"config file {p} must hold a mapping", "fix the YAML")
    return values


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Defaults, then the YAML file, then ``overrides`` (same nesting). Unknown keys are a ``UserError``."""
    merged = merge_config(read_config_file(path), overrides or {})
    cfg = _from_dict(PipelineConfig, merged, "")
    validate(cfg)
    return cfg


def merge_config(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: PipelineConfig) -> None:
    """Check every setting before anything is written."""
    from robustlab.antidote.realign import validate_mask_ratio

    if not cfg.base:
        raise UserError("no base model given", "set base: <local folder or hub id> in the config")
    if cfg.data.task not in BENIGN_TASKS:
        raise UserError(f"unknown task {cfg.data.task!r}", f"choose from {', '.join(BENIGN_TASKS)}")
    if not 0 <= cfg.data.harmful_ratio <= 1:
        raise UserError(f"harmful_ratio {cfg.data.harmful_ratio} is outside [0, 1]", "use e.g. 0.2")
    for stage in ("align", "finetune"):
        sc: StageConfig = getattr(cfg, stage)
        registered_method(sc.method, "alignment" if stage == "align" else "finetune")
        sc.train.validate()
    if not cfg.realign.mask_ratios:
        raise UserError("realign.mask_ratios is empty", "give at least one ratio, e.g. [0.1]")
    cfg.realign.mask_ratios = [validate_mask_ratio(r) for r in cfg.realign.mask_ratios]
    if cfg.realign.control_ratios is not None:
        cfg.realign.control_ratios = [validate_mask_ratio(r) for r in cfg.realign.control_ratios]
    if cfg.realign.method not in REALIGN_METHODS:
        raise UserError(f"unknown realign method {cfg.realign.method!r}", f"use {', '.join(REALIGN_METHODS)}")
    bad = [c for c in cfg.realign.controls if c not in CONTROLS]
    if bad:
        raise UserError(f"unknown control(s) {', '.join(bad)}", f"choose from {', '.join(CONTROLS)}")
    bad = [j for j in cfg.evaluate.judges if j not in JUDGES]
    if bad:
        raise UserError(f"unknown judge(s) {', '.join(bad)}", f"choose from {', '.join(JUDGES)}")
    if cfg.data.data_dir not in (None, "hub") and not Path(cfg.data.data_dir).is_dir():
        raise UserError(f"data folder {cfg.data.data_dir} does not exist", "fix data.data_dir")
    jm = cfg.evaluate.judge_model
    if jm and "beaverdam" in cfg.evaluate.judges:
        folder = Path(jm).expanduser()
        if (jm.startswith((".", "/", "~")) or folder.exists()) and not (folder / "config.json").is_file():
            raise UserError(
                f"judge model folder {folder} not found or has no config.json",
                f"pass a folder holding {BEAVERDAM_ID} (save_pretrained layout) or its hub id to --judge-model",
            )
    base = Path(cfg.base).expanduser()
    looks_local = cfg.base.startswith((".", "/", "~")) or base.exists()
    if looks_local and not (base / "config.json").is_file():
        raise UserError(f"base model folder {base} not found or has no config.json", "fix base in the config")


def with_judge_model(cfg: PipelineConfig, judge_model: str | None) -> PipelineConfig:
    """``cfg`` with the beaver-dam judge loaded from ``judge_model`` (the ``--judge-model`` flag: a local
    folder or a hub id), the judge added to ``evaluate.judges`` when missing; checked by :func:`validate`."""
    if judge_model:
        cfg.evaluate.judge_model = str(judge_model)
        if "beaverdam" not in cfg.evaluate.judges:
            cfg.evaluate.judges = [*cfg.evaluate.judges, "beaverdam"]
        validate(cfg)
    return cfg


def make_judges(
    names: list[str],
    data_dir: Any = None,
    cache: Path | None = None,
    seed: int = 0,
    judge_model: str | None = None,
) -> dict[str, Any]:
    """Judges by name. The embedding judge is trained on BeaverTails ``is_safe`` labels (held-out agreement
    recorded in ``<cache>/embedding_judge.json``) and cached there; ``minilm-ft`` is the fine-tuned judge
    that ``robustlab antidote judge train`` caches once (a UserError naming that command when it is
    missing); the beaver-dam judge loads
    ``judge_model`` (a local folder or hub id; default ``PKU-Alignment/beaver-dam-7b``)."""
    from robustlab.antidote import embedding_judge as EJ
    from robustlab.antidote import judges as J

    out: dict[str, Any] = {}
    for name in names:
        if name == "refusal":
            out[name] = J.RefusalJudge()
        elif name == "embedding":
            path = cache / "embedding_judge.json" if cache else None
            if path is not None and path.is_file():
                out[name] = EJ.EmbeddingJudge.load(path)
            else:
                judge, report = EJ.train_embedding_judge(None if data_dir == "hub" else data_dir, seed=seed)
                if path is not None:
                    judge.save(path)
                    from robustlab.runs import atomic_write_json

                    atomic_write_json(path.with_name("embedding_judge_report.json"), report)
                out[name] = judge
        elif name == "minilm-ft":
            from robustlab.antidote.finetuned_judge import load_finetuned_judge

            out[name] = load_finetuned_judge()
        else:
            out[name] = J.BeaverDamJudge(judge_model or J.BEAVERDAM_ID)
    return out


# --------------------------------------------------------------------------- the pipeline


def pipeline_data(cfg: PipelineConfig, seed: int | None = None) -> Any:
    """The pipeline's disjoint data slices for ``cfg.data`` (seed: ``cfg.seed`` unless given)."""
    from robustlab.antidote.data import build_harmful_finetuning

    d = cfg.data
    return build_harmful_finetuning(
        task=d.task,
        n=d.n,
        harmful_ratio=d.harmful_ratio,
        n_align=d.n_align,
        n_realign=d.n_realign,
        n_heldout=d.n_heldout,
        n_eval_harmful=d.n_eval_harmful,
        n_eval_task=d.n_eval_task,
        align_with_refusals=d.align_with_refusals,
        align_with_safe_pairs=d.align_with_safe_pairs,
        data_dir=d.data_dir,
        seed=cfg.seed if seed is None else seed,
    )


def save_checkpoint(model: Any, tokenizer: Any, folder: Path) -> None:
    import shutil

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def align_stage(cfg: PipelineConfig, run: Any, data: Any, params: DefenceParams, echo: Any = print) -> str:
    """The alignment stage of :func:`run_pipeline` into the open run folder ``run`` (skipped when its cell
    exists): ``stages/aligned`` (merged) and, with LoRA, ``stages/aligned-adapter``. Returns the aligned
    model's folder (the base when ``align.skip``)."""
    from robustlab.antidote.models import load_model
    from robustlab.runs import cell_key

    if cfg.align.skip:
        return cfg.base
    stages = run.path / "stages"
    aligned_dir = stages / "aligned"
    if not run.is_done(cell_key(stage="align")):
        echo("align: training")
        model, tokenizer = load_model(cfg.base, trust_remote_code=cfg.trust_remote_code)
        tcfg = dataclasses.replace(cfg.align.train, seed=cfg.seed)
        model, res = run_stage(cfg.align.method, model, tokenizer, data.alignment, tcfg, data, params)
        if tcfg.mode == "lora":
            # the alignment adapter itself (a few MB) is kept beside the merged model, to be shared
            save_checkpoint(model, tokenizer, stages / "aligned-adapter")
            model = model.merge_and_unload()  # the official code merges the alignment adapter first
        save_checkpoint(model, tokenizer, aligned_dir)
        run.save(
            cell_key(stage="align"), {"steps": res.steps, "loss_last": res.losses[-1], "seconds": res.seconds}
        )
        run.log(stage="align", steps=res.steps, loss_last=res.losses[-1], seconds=res.seconds)
    return str(aligned_dir)


def evaluate_point(
    cfg: PipelineConfig, data: Any, judges: dict, model: Any, tokenizer: Any, grid: bool = False
) -> dict[str, Any]:
    """Every measure of one evaluated point of a run (:func:`robustlab.antidote.evaluate.evaluate_model`) on
    the run's evaluation prompts and task rows (with ``grid``: their first ``n_eval_*_grid``), keeping every
    answer and task output when ``evaluate.keep_answers`` (what rescoring and paired differences read)."""
    from robustlab.antidote.evaluate import EvalSettings, evaluate_model

    t = time.perf_counter()
    ev = cfg.evaluate
    settings = EvalSettings(
        ev.max_new_tokens_harmful, ev.max_new_tokens_task, ev.batch_size, ev.max_prompt, ev.max_length
    )
    prompts, rows = data.eval_harmful, data.eval_task
    if grid:
        prompts = prompts[: ev.n_eval_harmful_grid] if ev.n_eval_harmful_grid is not None else prompts
        rows = rows[: ev.n_eval_task_grid] if ev.n_eval_task_grid is not None else rows
    m = evaluate_model(
        model,
        tokenizer,
        cfg.data.task,
        prompts,
        rows,
        data.heldout_harmful,
        judges,
        settings,
        keep_outputs=max(len(prompts), len(rows)) if ev.keep_answers else 5,
    )
    if ev.keep_answers:
        m["answers_harmful"] = m.pop("samples_harmful", [])
        m["answers_task"] = m.pop("samples_task", [])
    m["n_eval_harmful"], m["n_eval_task"] = len(prompts), len(rows)
    m["eval_seconds"] = round(time.perf_counter() - t, 2)
    return m


def realign_inputs(label: str, method: str, data: Any, tokenizer: Any, rc: Any) -> tuple[Any, str]:
    """(calibration batches or ``None``, scoring) of one re-alignment point: Wanda on the harmful re-alignment
    slice (Antidote), Wanda on the benign fine-tuning mix (the ``benign`` control), or data-free ``random`` /
    ``magnitude`` scores."""
    from robustlab.antidote.calibration import calibration_batches

    if method not in ("wanda", "benign"):
        return None, method
    texts = data.benign_calibration if label == "benign" else data.realign
    return calibration_batches(tokenizer, [e.text for e in texts], rc.batch_size, rc.max_length), "wanda"


def run_pipeline(
    cfg: PipelineConfig, out: str | Path, echo: Any = print, params: DefenceParams | None = None
) -> dict[str, Any]:
    """Run (or resume) the whole pipeline into ``out``; returns the summary (also in ``summary.json``).
    ``params``: the hyper-parameters of the stage methods (the papers' by default)."""
    import copy

    from robustlab.antidote.models import load_model
    from robustlab.antidote.realign import (
        apply_masks,
        calibration_hash,
        realign_masks,
        resolve_targets,
        save_realigned,
    )
    from robustlab.runs import RunDir, cell_key, seed_everything

    validate(cfg)
    params = (params or DefenceParams()).validate()
    data = pipeline_data(cfg)
    run = RunDir.open(out, asdict(cfg), seed=cfg.seed)
    stages = run.path / "stages"
    stages.mkdir(exist_ok=True)
    seed_everything(cfg.seed)
    judges = make_judges(cfg.evaluate.judges, cfg.data.data_dir, run.path, cfg.seed, cfg.evaluate.judge_model)
    ev = cfg.evaluate

    def evaluate(model: Any, tokenizer: Any, grid: bool = False) -> dict:
        return evaluate_point(cfg, data, judges, model, tokenizer, grid)

    def record(key: str, meta: dict, compute: Any) -> dict:
        if run.is_done(key):
            return run.load(key)
        t = time.perf_counter()
        row = {**meta, **compute()}
        row.setdefault("seconds", round(time.perf_counter() - t, 2))
        run.save(key, row)
        run.log(**{k: v for k, v in row.items() if not str(k).startswith(("samples", "answers"))})
        return row

    # 1. alignment -------------------------------------------------------------------------------------
    aligned_src = align_stage(cfg, run, data, params, echo)
    model, tokenizer = load_model(aligned_src, trust_remote_code=cfg.trust_remote_code)
    rows = [
        record(
            cell_key(stage="eval", point="aligned"),
            {"stage": "aligned", "ratio": 0.0},
            lambda: evaluate(model, tokenizer),
        )
    ]

    # 2. harmful fine-tuning ---------------------------------------------------------------------------
    ft_dir = stages / "finetuned"
    ft = cfg.finetune
    if not run.is_done(cell_key(stage="finetune")):
        echo("finetune: training")
        tcfg = dataclasses.replace(ft.train, seed=cfg.seed)
        ft_model, res = run_stage(
            ft.method, copy.deepcopy(model), tokenizer, data.finetune, tcfg, data, params
        )
        save_checkpoint(ft_model, tokenizer, ft_dir)
        run.save(
            cell_key(stage="finetune"),
            {"steps": res.steps, "loss_last": res.losses[-1], "seconds": res.seconds},
        )
        run.log(stage="finetune", steps=res.steps, loss_last=res.losses[-1], seconds=res.seconds)
        del ft_model
    if ft.train.mode == "lora":
        ft_model, tokenizer = load_model(
            aligned_src, adapter=str(ft_dir), trust_remote_code=cfg.trust_remote_code
        )
    else:
        ft_model, tokenizer = load_model(str(ft_dir), trust_remote_code=cfg.trust_remote_code)
    rows.append(
        record(
            cell_key(stage="eval", point="finetuned"),
            {"stage": "finetuned", "ratio": 0.0},
            lambda: evaluate(ft_model, tokenizer),
        )
    )

    # 3. re-alignment: one score computation per method, every ratio from it ----------------------------
    rc = cfg.realign
    resolve_targets(ft_model, rc.targets)  # an unknown target fails here, before any scoring
    methods = [] if rc.skip else [("antidote", rc.method), *[(c, c) for c in rc.controls]]

    def ratios_of(label: str) -> list[float]:
        if label == "antidote" or rc.control_ratios is None:
            return list(rc.mask_ratios)
        return list(rc.control_ratios)

    todo = [
        (label, r)
        for label, _ in methods
        for r in ratios_of(label)
        if not run.is_done(cell_key(stage="eval", point=label, ratio=r))
    ]
    # scores once per method (masks are small bool tensors), then the evaluations, the primary points first
    found: dict[str, tuple[Any, Any, float]] = {}
    for label, method in methods:
        ratios = [r for lab, r in todo if lab == label]
        if not ratios:
            continue
        # masks always come from the unpruned fine-tuned model: every ratio is undone after its evaluation
        t = time.perf_counter()
        batches, scoring = realign_inputs(label, method, data, tokenizer, rc)
        masks = realign_masks(ft_model, batches, ratios, rc.targets, scoring, cfg.seed)
        found[label] = (masks, batches, time.perf_counter() - t)
        run.log(stage="scores", method=label, seconds=found[label][2])

    def priority(item: tuple[str, float]) -> tuple[int, int]:
        label, r = item
        primary = r in ev.primary_ratios
        return (0 if primary and label == "antidote" else 1 if primary else 2, todo.index(item))

    for label, r in sorted(todo, key=priority):
        masks, batches, score_seconds = found[label]
        pruned = apply_masks(ft_model, masks.masks[r], remember=True)
        if rc.save_models:
            save_realigned(
                ft_model,
                masks.result(r, pruned.counts),
                stages / f"realigned-{label}-{r:g}",
                calibration_digest=calibration_hash(batches) if batches else None,
                tokenizer=tokenizer,
                extra={"calibration": label},
            )
        record(
            cell_key(stage="eval", point=label, ratio=r),
            {
                "stage": label,
                "ratio": r,
                "zeroed": sum(pruned.counts.values()),
                "score_seconds": score_seconds,
            },
            lambda grid=not (label == "antidote" and r in ev.primary_ratios): evaluate(
                ft_model, tokenizer, grid=grid
            ),
        )
        pruned.restore(ft_model)
    rows += [
        run.load(cell_key(stage="eval", point=label, ratio=r))
        for label, _ in methods
        for r in ratios_of(label)
    ]

    # 4. table and plot --------------------------------------------------------------------------------
    from robustlab.antidote.pipeline_report import results_table, tradeoff_plot

    table = results_table(rows, cfg.evaluate.judges)
    (run.path / "results.md").write_text(table + "\n", encoding="utf-8")
    plot = tradeoff_plot(rows, cfg.evaluate.judges[0], run.path / "tradeoff.png")
    summary = {
        "rows": [{k: v for k, v in r.items() if not str(k).startswith(("samples", "answers"))} for r in rows],
        "table": table,
        "plot": str(plot),
    }
    run.write_summary(summary)
    return summary
