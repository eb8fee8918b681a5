"""The sweep's two harnesses: the offline tiny model (:func:`tiny_harness`, with :func:`tiny_sweep_config`)
and a real model from a pipeline config (:func:`pipeline_harness`). Each gives one seed's data, tokenizer,
unaligned model, stage settings and evaluation."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustlab.antidote.methods import DefenceParams
from robustlab.antidote.sweep import Harness, SweepConfig
from robustlab.errors import UserError


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


def harness_evaluator(tokenizer: Any, task: str, data: Any, judges: dict, settings: Any) -> Any:
    """A harness's ``evaluate(model)``: :func:`~robustlab.antidote.evaluate.evaluate_model` on the data's
    evaluation slices (keeping 3 sample answers) plus the likelihood-read task accuracy, both at the
    settings' batch size and maximum length."""
    from robustlab.antidote.evaluate import evaluate_model

    def evaluate(model: Any) -> dict:
        m = evaluate_model(
            model,
            tokenizer,
            task,
            data.eval_harmful,
            data.eval_task,
            data.heldout_harmful,
            judges,
            settings,
            keep_outputs=3,
        )
        m["fa_likelihood"] = label_likelihood_accuracy(
            model, tokenizer, task, data.eval_task, settings.max_length, settings.batch_size
        )
        return m

    return evaluate


def tiny_harness(demo: Any, seed: int, cache: Path, data_dir: Any = None, log: Any = None) -> Harness:
    """The offline harness: the demo's data slices and pretrained tiny base (cached in ``cache``), full-SFT
    alignment with the demo's settings, LoRA fine-tuning with the demo's attack settings."""
    from robustlab.antidote.evaluate import EvalSettings
    from robustlab.antidote.judges import RefusalJudge
    from robustlab.antidote.tiny import demo_data, load_or_build_base, train_config

    data, docs = demo_data(demo, seed, data_dir)
    base, tokenizer = load_or_build_base(demo, seed, docs, data, cache, log or (lambda **_: None))
    # prompts as long as training saw them (encode_example keeps at most 3/4 of max_length for the prompt)
    settings = EvalSettings(
        demo.max_new_tokens_harmful, demo.max_new_tokens_task, 32, (3 * demo.max_length) // 4, demo.max_length
    )
    judges = {"refusal": RefusalJudge()}

    evaluate = harness_evaluator(tokenizer, demo.task, data, judges, settings)

    return Harness(
        data=data,
        tokenizer=tokenizer,
        unaligned=lambda: copy.deepcopy(base),
        align_config=train_config(demo.align, seed, demo.max_length),
        finetune_config=train_config(demo.attack_lora, seed, demo.max_length),
        evaluate=evaluate,
    )


def pipeline_harness(cfg: Any, seed: int, cache: Path) -> Harness:
    """A real model from a :class:`robustlab.antidote.pipeline.PipelineConfig`: its base, data slices, stage
    settings and judges. ``align.skip: true`` treats the base as already aligned (then alignment-stage
    defences cannot run)."""
    from robustlab.antidote.evaluate import EvalSettings
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

    evaluate = harness_evaluator(tokenizer, d.task, data, judges, settings)

    return Harness(
        data=data,
        tokenizer=tokenizer,
        unaligned=lambda: load_model(cfg.base, trust_remote_code=cfg.trust_remote_code)[0],
        align_config=dataclasses.replace(cfg.align.train, seed=seed),
        finetune_config=dataclasses.replace(cfg.finetune.train, seed=seed),
        evaluate=evaluate,
        align_needed=not cfg.align.skip,
    )
