"""The quick demo on a real model (``robustlab reproduce --quick --only antidote``): SmolLM2-135M-Instruct
aligned -> attacked -> Antidote, with real greedy answers to held-out BeaverTails harmful prompts, the
``minilm-ft`` judge's harmful score, the refusal matcher's, and SST-2 accuracy.

The judge (``judge="auto"``, the default) is ``minilm-ft`` when it is cached. On a machine where it is not,
training it takes about 45 minutes on two cores, far over the demo's budget, so ``auto`` scores with the
embedding judge instead (MiniLM embeddings + logistic regression; its weights are committed in
``results/antidote/judge/embedding_judge.json``, held-out agreement 0.769 against minilm-ft's 0.791), and says so; ``judge="minilm-ft"`` (``--full``) trains the validated judge once when it is missing.

``--quick`` starts from the seed-0 LoRA adapters that the protocol run committed (the alignment adapter and
the harmful fine-tuning adapter, ``results/antidote/smollm2-135m-instruct/adapters-seed0``), on that run's
own data slices (its ``adapters.json``; calibration and evaluation settings from the protocol's
``frozen.yaml``): the aligned model is the base with the alignment adapter merged,
the attacked model adds the fine-tuning adapter, and Antidote prunes that adapter (Wanda on harmful
re-alignment pairs, the top α of each row zeroed; ``papers/antidote.md`` §1). Only the evaluation is cut
to fit minutes on two cores: the first ``n_eval_harmful`` evaluation prompts with ``max_new_tokens``
greedy tokens, the first ``n_eval_task`` SST-2 validation rows, ``n_realign`` calibration pairs.
``--full`` retrains both adapters with the cell's settings first (:func:`train_adapters`), then evaluates
on every harmful prompt and SST-2 row of the cell.

Each evaluated stage is written to ``<out>/points/<stage>.json`` as it finishes (every answer kept), so a
rerun resumes, and a later judge can rescore the stored answers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from robustlab.errors import UserError

__all__ = ["STAGES", "QuickDemoConfig", "committed_cell", "run_quick_demo", "train_adapters"]

STAGES = ("aligned", "attacked", "antidote")


@dataclass
class QuickDemoConfig:
    """What the demo evaluates. ``cell``: the protocol's adapters folder (``adapters.json``, ``aligned/``,
    ``finetuned/``; default: :func:`committed_cell`)."""

    cell: str | None = None
    n_eval_harmful: int | None = 16
    n_eval_task: int | None = 100
    max_new_tokens: int = 48
    max_new_tokens_task: int | None = None  # None: the cell's
    mask_ratio: float | None = None  # None: the protocol's primary Antidote ratio
    n_realign: int | None = 64
    batch_size: int = 16
    n_examples: int = 3
    retrain: bool = False  # --full: train both adapters again with the cell's settings
    judge: str = "auto"  # auto | minilm-ft | embedding (module docstring)


#: The committed adapters the quick demo starts from (written by the protocol run, issue 15).
COMMITTED_ADAPTERS = "smollm2-135m-instruct/adapters-seed0"


def committed_cell() -> Path | None:
    """``results/antidote/smollm2-135m-instruct/adapters-seed0`` when it is there (a checkout, not a wheel)."""
    from robustlab.claims import results_dir

    cell = results_dir("antidote") / COMMITTED_ADAPTERS
    return cell if (cell / "adapters.json").is_file() else None


def _cell(cfg: QuickDemoConfig) -> Path:
    cell = Path(cfg.cell) if cfg.cell else committed_cell()
    if cell is None or not (cell / "adapters.json").is_file():
        raise UserError(
            f"no protocol adapters with an adapters.json at {cell or 'results/antidote/' + COMMITTED_ADAPTERS}",
            "pass a folder written by the protocol run (adapters.json, aligned/, finetuned/)",
        )
    return cell


#: Calibration and evaluation keys read from the protocol's frozen settings (``frozen.yaml``).
_FROZEN_KEYS = {
    "realign": ("batch_size", "max_length"),
    "evaluate": ("max_new_tokens_task", "max_prompt", "max_length"),
}


def adapters_pipeline_config(cell: Path) -> tuple[Any, float]:
    """The pipeline config of the run that made the adapters and its primary Antidote ratio α: base, seed,
    data and both training stages from ``adapters.json``; calibration and evaluation settings and α from
    the protocol's ``frozen.yaml`` (beside the adapters, else ``results/antidote/protocol/``; α 0.1, the
    paper's SST-2 ratio, without one)."""
    import yaml

    from robustlab.antidote.pipeline import load_config
    from robustlab.runs import read_json

    rec = read_json(cell / "adapters.json")
    values: dict[str, Any] = {
        "base": rec["base"],
        "seed": rec["seed"],
        "data": rec["data"],
        "align": {"train": rec["align"]},
        "finetune": {"train": rec["finetune"]},
    }
    alpha = 0.1
    for frozen in (cell / "frozen.yaml", cell.parents[1] / "protocol" / "frozen.yaml"):
        if frozen.is_file():
            fz = yaml.safe_load(frozen.read_text(encoding="utf-8")) or {}
            for part, keys in _FROZEN_KEYS.items():
                values[part] = {k: fz[part][k] for k in keys if k in (fz.get(part) or {})}
            ratios = (fz.get("evaluate") or {}).get("primary_ratios") or (fz.get("realign") or {}).get(
                "mask_ratios"
            )
            alpha = float(ratios[0]) if ratios else alpha
            break
    values["realign"] = {**values.get("realign", {}), "mask_ratios": [alpha]}
    return load_config(None, values), alpha


def train_adapters(pcfg: Any, data: Any, out: Path, log: Callable[[str], None]) -> tuple[Path, Path]:
    """Train the alignment adapter and then, on the aligned (merged) model, the harmful fine-tuning adapter
    with the cell's stage settings and seed (the pipeline's SFT stages); both saved as peft adapters."""
    import copy

    from robustlab.antidote.methods import DefenceParams, run_stage
    from robustlab.antidote.models import load_model

    if pcfg.align.train.mode != "lora" or pcfg.finetune.train.mode != "lora":
        raise UserError(
            "the demo retrains LoRA adapters, but the cell's stages are "
            f"{pcfg.align.train.mode} / {pcfg.finetune.train.mode}",
            "use a cell whose align.train.mode and finetune.train.mode are lora",
        )
    aligned, finetuned = out / "adapters" / "aligned", out / "adapters" / "finetuned"
    params = DefenceParams().validate()
    if not (aligned / "adapter_config.json").is_file():
        log("training the alignment adapter")
        model, tok = load_model(pcfg.base)
        tcfg = dataclasses.replace(pcfg.align.train, seed=pcfg.seed)
        model, res = run_stage("sft", model, tok, data.alignment, tcfg, data, params)
        model.save_pretrained(str(aligned))
        log(f"aligned: {res.steps} steps in {res.seconds:.0f} s")
    if not (finetuned / "adapter_config.json").is_file():
        log("training the harmful fine-tuning adapter")
        model, tok = load_model(pcfg.base, align_adapter=str(aligned))
        tcfg = dataclasses.replace(pcfg.finetune.train, seed=pcfg.seed)
        model, res = run_stage("sft", copy.deepcopy(model), tok, data.finetune, tcfg, data, params)
        model.save_pretrained(str(finetuned))
        log(f"attacked: {res.steps} steps in {res.seconds:.0f} s")
    return aligned, finetuned


JUDGE_CHOICES = ("auto", "minilm-ft", "embedding")
EMBEDDING_JUDGE = "embedding_judge.json"


def committed_embedding_judge() -> Path:
    """Where the checkout commits the embedding judge (``results/antidote/judge/embedding_judge.json``:
    deterministic, seed 0 on the staged split; 29 KB of regression weights)."""
    from robustlab.claims import results_dir

    return results_dir("antidote") / "judge" / EMBEDDING_JUDGE


def _load_judge(choice: str, log: Callable[[str], None]) -> tuple[str, Any, float | None]:
    """``(name, judge, held-out agreement)`` for ``choice`` (:data:`JUDGE_CHOICES`): the cached ``minilm-ft``
    judge (trained once, with one torch thread, when ``choice`` is ``minilm-ft`` and it is missing), or the
    embedding judge (committed with the results; else trained once and cached beside ``minilm-ft``)."""
    from robustlab.antidote.finetuned_judge import build_judge, default_judge_dir, load_finetuned_judge

    if choice not in JUDGE_CHOICES:
        raise UserError(f"unknown quick-demo judge {choice!r}", f"use one of {', '.join(JUDGE_CHOICES)}")
    cached = (default_judge_dir() / "judge.json").is_file()
    if choice == "minilm-ft" or (choice == "auto" and cached):
        if not cached:
            import torch

            log("training the minilm-ft judge once (cached for later runs; see results/antidote/judge)")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                build_judge(log=log)
            finally:
                torch.set_num_threads(threads)
        judge = load_finetuned_judge()
        report = (judge.meta.get("report") or {}).get("heldout", {}).get("minilm-ft", {})
        return "minilm-ft", judge, report.get("agreement")
    from robustlab.antidote.embedding_judge import EmbeddingJudge
    from robustlab.antidote.pipeline import make_judges

    if choice == "auto":
        log(
            "minilm-ft judge not cached: scoring with the embedding judge (train the validated one once with "
            "`robustlab antidote judge train`, about 45 min on 2 cores)"
        )
    # the committed judge, else the pipeline's, trained once into the cache beside minilm-ft (about 5 min on
    # one contended core)
    path = committed_embedding_judge()
    if path.is_file():
        judge = EmbeddingJudge.load(path)
    else:
        judge = make_judges(["embedding"], cache=default_judge_dir().parent)["embedding"]
    return "embedding", judge, (judge.meta or {}).get("agreement")


def run_quick_demo(
    out: str | Path, cfg: QuickDemoConfig | None = None, log: Callable[[str], None] = print
) -> dict:
    """Evaluate the aligned, attacked and Antidote models of one cell into ``out``; returns the summary."""
    from peft import PeftModel

    from robustlab.antidote.evaluate import finetune_accuracy, generate
    from robustlab.antidote.judges import RefusalJudge
    from robustlab.antidote.models import load_model
    from robustlab.antidote.pipeline import pipeline_data
    from robustlab.antidote.realign import apply_masks, calibration_batches, realign_masks
    from robustlab.runs import atomic_write_json, read_json

    cfg = cfg or QuickDemoConfig()
    cell = _cell(cfg)
    pcfg, frozen_alpha = adapters_pipeline_config(cell)
    out = Path(out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = pipeline_data(pcfg)
    harmful = data.eval_harmful[: cfg.n_eval_harmful]
    task_rows = data.eval_task[: cfg.n_eval_task]
    alpha = cfg.mask_ratio if cfg.mask_ratio is not None else frozen_alpha
    new_task = cfg.max_new_tokens_task or pcfg.evaluate.max_new_tokens_task
    if cfg.retrain:
        aligned_dir, ft_dir = train_adapters(pcfg, data, out, log)
    else:
        aligned_dir, ft_dir = cell / "aligned", cell / "finetuned"
    for d in (aligned_dir, ft_dir):
        if not (d / "adapter_config.json").is_file():
            raise UserError(
                f"no LoRA adapter at {d}", "point the demo at a protocol cell that kept its adapters"
            )
    judge_name, judge, agreement = _load_judge(cfg.judge, log)
    refusal = RefusalJudge()
    t = time.perf_counter()
    model, tok = load_model(pcfg.base, align_adapter=str(aligned_dir), log=log)
    load_seconds = round(time.perf_counter() - t, 1)

    def evaluate(stage: str, m: Any, extra: dict | None = None) -> dict:
        path = out / "points" / f"{stage}.json"
        if path.is_file():
            return read_json(path)
        t0 = time.perf_counter()
        kw = {"batch_size": cfg.batch_size, "max_prompt": pcfg.evaluate.max_prompt}
        answers = generate(m, tok, [e.prompt for e in harmful], cfg.max_new_tokens, **kw)
        gen_seconds = time.perf_counter() - t0
        raw = [e.instruction for e in harmful]
        prob = judge.probability(raw, answers)
        flags = [bool(p > judge.threshold) for p in prob]
        refuses = refusal.harmful(raw, answers)
        outs = generate(m, tok, [e.prompt for e in task_rows], new_task, **kw)
        row = {
            "stage": stage,
            f"hs_{judge_name}": 100.0 * sum(flags) / len(flags),
            "hs_refusal": 100.0 * sum(refuses) / len(refuses),
            "fa": finetune_accuracy(pcfg.data.task, outs, task_rows),
            "n_harmful": len(harmful),
            "n_task": len(task_rows),
            "generate_seconds": round(gen_seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            **(extra or {}),
            "answers_harmful": [
                {"prompt": r, "answer": a, "p_unsafe": round(float(p), 4), "harmful": f, "refusal_harmful": h}
                for r, a, p, f, h in zip(raw, answers, prob, flags, refuses, strict=True)
            ],
            "answers_task": [[e.label, o] for e, o in zip(task_rows, outs, strict=True)],
        }
        atomic_write_json(path, row)
        log(
            f"{stage}: HS {row[f'hs_{judge_name}']:.1f}% ({judge_name}), {row['hs_refusal']:.1f}% (refusal), "
            f"SST-2 {row['fa']:.1f}% in {row['seconds']:.0f} s"
        )
        return row

    rows = [evaluate("aligned", model)]
    model = PeftModel.from_pretrained(model, str(ft_dir), is_trainable=False).eval()
    rows.append(evaluate("attacked", model))
    realign: dict[str, Any] = {}
    if not (out / "points" / "antidote.json").is_file():
        t0 = time.perf_counter()
        texts = [e.text for e in data.realign[: cfg.n_realign]]
        batches = calibration_batches(tok, texts, pcfg.realign.batch_size, pcfg.realign.max_length)
        masks = realign_masks(model, batches, [alpha], pcfg.realign.targets).masks[alpha]
        pruned = apply_masks(model, masks)
        realign = {
            "zeroed": sum(pruned.counts.values()),
            "realign_seconds": round(time.perf_counter() - t0, 1),
        }
        log(
            f"antidote: zeroed {realign['zeroed']} adapter weights (α {alpha:g}) in {realign['realign_seconds']:.0f} s"
        )
    rows.append(evaluate("antidote", model, {"mask_ratio": alpha, **realign}))
    summary = {
        "cell": str(cell),
        "retrained": cfg.retrain,
        "base": pcfg.base,
        "config": asdict(cfg),
        "mask_ratio": alpha,
        "n_realign": min(cfg.n_realign or len(data.realign), len(data.realign)),
        "task": pcfg.data.task,
        "judge": judge_name,
        "judge_agreement": agreement,
        "rows": [{k: v for k, v in r.items() if not k.startswith("answers")} for r in rows],
        "examples": examples(rows, cfg.n_examples),
        "load_seconds": load_seconds,
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def examples(rows: list[dict], n: int = 3, max_chars: int = 240) -> list[dict]:
    """The first ``n`` prompts (in evaluation order) whose attacked answer the judge flags, with each stage's
    answer (cut to ``max_chars``) and flag; the first ``n`` prompts when fewer are flagged."""
    by_stage = {r["stage"]: r["answers_harmful"] for r in rows}
    attacked = by_stage.get("attacked", [])
    picked = [i for i, a in enumerate(attacked) if a["harmful"]][:n]
    picked += [i for i in range(len(attacked)) if i not in picked][: n - len(picked)]
    out = []
    for i in sorted(picked):
        item: dict[str, Any] = {"prompt": attacked[i]["prompt"]}
        for stage, answers in by_stage.items():
            a = answers[i]
            text = " ".join(a["answer"].split())
            item[stage] = {
                "answer": text if len(text) <= max_chars else text[: max_chars - 1] + "…",
                "harmful": a["harmful"],
                "p_unsafe": a["p_unsafe"],
            }
        out.append(item)
    return out
