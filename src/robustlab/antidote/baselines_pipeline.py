"""The harmful fine-tuning pipeline with a ``method:`` (the baselines as configurable stages), built on
:mod:`robustlab.antidote.pipeline` without changing it.

A config is the pipeline's YAML plus two keys:

- ``method:`` an ``align+finetune+post`` string (:func:`robustlab.antidote.methods.parse_method`), e.g.
  ``vaccine``, ``lisa``, ``safelora``, ``vaccine+sft+antidote``; it sets ``align.method`` and
  ``finetune.method``;
- ``defences:`` the defences' hyper-parameters (:class:`robustlab.antidote.methods.DefenceParams`; the
  papers' by default).

:func:`run_method_pipeline` runs :func:`robustlab.antidote.pipeline.run_pipeline` (align -> fine-tune ->
Antidote mask-ratio sweep + controls -> evaluate, resumable) with the defences' hyper-parameters, then, for a ``safelora`` / ``resta`` post step, applies it to the fine-tuned model and adds an
evaluated point. The Antidote rows of the pipeline are the ``+antidote`` variant of the same method.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from robustlab.antidote.methods import DefenceParams, MethodSpec, apply_post, parse_method
from robustlab.errors import UserError


@dataclasses.dataclass
class MethodPipelineConfig:
    pipeline: Any  # robustlab.antidote.pipeline.PipelineConfig
    spec: MethodSpec
    defences: DefenceParams


def load_method_config(path: str | Path | None = None, overrides: dict | None = None) -> MethodPipelineConfig:
    """The pipeline config (file, then ``overrides``) with ``method`` and ``defences`` taken out and checked."""
    from robustlab.antidote.pipeline import load_config, merge_config, read_config_file

    values = merge_config(read_config_file(path), overrides or {})
    method = values.pop("method", None)
    raw = values.pop("defences", None) or {}
    if not isinstance(raw, dict):
        raise UserError("defences must be a mapping", "write defences: {vaccine_rho: 2, ...}")
    unknown = sorted(set(raw) - set(DefenceParams.__dataclass_fields__))
    if unknown:
        raise UserError(
            f"unknown defence setting(s): {', '.join(unknown)}",
            f"allowed: {', '.join(DefenceParams.__dataclass_fields__)}",
        )
    params = DefenceParams(**raw).validate()
    align = values.get("align") or {}
    finetune = values.get("finetune") or {}
    if method is not None:
        spec = parse_method(method)
    else:
        a, f = str(align.get("method", "sft")), str(finetune.get("method", "sft"))
        spec = parse_method(f"{a}+{f}")  # checks each name against its stage
    values["align"] = {**align, "method": "sft"}
    values["finetune"] = {**finetune, "method": "sft"}
    cfg = load_config(None, values)  # every other key is checked by the pipeline itself
    if spec.post in ("safelora", "resta") and cfg.align.skip:
        raise UserError(
            f"{spec.post} needs the model before alignment, but align.skip is true",
            "set align.skip: false (the base is then the unaligned model)",
        )
    cfg.align.method, cfg.finetune.method = spec.align, spec.finetune
    return MethodPipelineConfig(cfg, spec, params)


def run_method_pipeline(mcfg: MethodPipelineConfig, out: str | Path, echo: Any = print) -> dict[str, Any]:
    """Run (or resume) the pipeline for one method into ``out``; returns the pipeline summary with the post
    step's row added (``results.md`` and ``summary.json`` are rewritten with it)."""
    from robustlab.antidote.models import load_model
    from robustlab.antidote.pipeline import evaluate_point, make_judges, pipeline_data, run_pipeline
    from robustlab.antidote.pipeline_report import results_table
    from robustlab.runs import RunDir, atomic_write_json, cell_key, read_json

    cfg, spec, params = mcfg.pipeline, mcfg.spec, mcfg.defences
    out = Path(out)
    record_file = out / "method.json"
    record = {"method": spec.name, "defences": params.as_dict()}
    if record_file.is_file() and read_json(record_file) != record:
        raise UserError(
            f"{out} holds a run of another method or other defence settings",
            "choose another --out folder, or rerun with the same settings to resume",
        )
    d = cfg.data
    data = pipeline_data(cfg)  # the same slices run_pipeline builds
    summary = run_pipeline(cfg, out, echo=echo, params=params)
    atomic_write_json(record_file, record)
    if spec.post not in ("safelora", "resta"):
        return {**summary, "method": spec.name}
    run = RunDir(out)
    key = cell_key(stage="eval", point=spec.post)
    if not run.is_done(key):
        echo(f"{spec.post}: applying")
        stages = out / "stages"
        aligned_src = str(stages / "aligned")
        if cfg.finetune.train.mode == "lora":
            ft, tokenizer = load_model(aligned_src, adapter=str(stages / "finetuned"))
        else:
            ft, tokenizer = load_model(str(stages / "finetuned"))
        aligned_ref, _ = load_model(aligned_src, trust_remote_code=cfg.trust_remote_code)
        unaligned_ref, _ = load_model(cfg.base, trust_remote_code=cfg.trust_remote_code)
        model, info = apply_post(
            spec.post,
            ft,
            tokenizer,
            aligned=aligned_ref,
            unaligned=unaligned_ref,
            params=params,
            seed=cfg.seed,
        )
        judges = make_judges(cfg.evaluate.judges, d.data_dir, out, cfg.seed, cfg.evaluate.judge_model)
        # the same measures and stored answers as the pipeline's points (rescoring, paired differences)
        row = {
            "stage": spec.post,
            "ratio": 0.0,
            **info,
            **evaluate_point(cfg, data, judges, model, tokenizer),
        }
        run.save(key, row)
        run.log(**{k: v for k, v in row.items() if not str(k).startswith(("samples", "answers"))})
    post_row = {k: v for k, v in run.load(key).items() if not str(k).startswith(("samples", "answers"))}
    rows = [*summary["rows"][:2], post_row, *summary["rows"][2:]]
    table = results_table(rows, cfg.evaluate.judges)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    summary = {**summary, "rows": rows, "table": table, "method": spec.name}
    run.write_summary(summary)
    return summary
