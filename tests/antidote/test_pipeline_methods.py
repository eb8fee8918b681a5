"""The pipeline with a ``method:`` (baselines_pipeline): config checks and a tiny run of a combination."""

from __future__ import annotations

import pytest
import torch

from robustlab.antidote.baselines_pipeline import load_method_config, run_method_pipeline
from robustlab.antidote.tiny import TinyModelConfig, tiny_llama, train_tokenizer
from robustlab.errors import UserError

torch.set_num_threads(1)


def test_method_sets_the_stage_methods_and_is_checked(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    m = load_method_config(overrides={"base": str(base), "method": "vaccine+lisa+safelora"})
    assert (m.pipeline.align.method, m.pipeline.finetune.method, m.spec.post) == (
        "vaccine",
        "lisa",
        "safelora",
    )
    assert m.defences.vaccine_rho == 2.0 and m.defences.ldifs_rho == 1e-4
    m = load_method_config(overrides={"base": str(base), "finetune": {"method": "ldifs"}})
    assert m.pipeline.finetune.method == "ldifs" and m.spec.post == "none"
    for bad in (
        {"method": "bogus"},
        {"method": "resta", "align": {"skip": True}},
        {"align": {"method": "lisa"}},
        {"finetune": {"method": "vaccine"}},
        {"defences": {"antidote_ratio": 0}},
        {"defences": {"nope": 1}},
    ):
        with pytest.raises(UserError):
            load_method_config(overrides={"base": str(base), **bad})


@pytest.mark.integration
def test_pipeline_runs_a_combination(tmp_path, shared_data):
    from robustlab.antidote.data import load_beavertails, load_task

    texts = [e.text for e in load_beavertails("unsafe_train", shared_data)[:200]]
    texts += [e.text for e in load_task("sst2", "train", shared_data)[:200]]
    tok = train_tokenizer(texts, 400)
    model = tiny_llama(
        tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), 0
    )
    base = tmp_path / "base"
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    train = {"mode": "full", "lr": 1e-3, "epochs": 1, "batch_size": 8, "max_length": 64}
    mcfg = load_method_config(
        overrides={
            "base": str(base),
            "method": "booster+sft+resta",
            "data": {
                "data_dir": str(shared_data),
                "task": "sst2",
                "n": 32,
                "harmful_ratio": 0.25,
                "n_align": 16,
                "n_realign": 8,
                "n_heldout": 4,
                "n_eval_harmful": 4,
                "n_eval_task": 4,
            },
            "align": {"train": train},
            "finetune": {"train": {**train, "mode": "lora", "lora_r": 4, "lora_alpha": 8}},
            "realign": {"mask_ratios": [0.1], "batch_size": 4, "max_length": 64, "save_models": False},
            "evaluate": {
                "max_new_tokens_harmful": 2,
                "max_new_tokens_task": 2,
                "max_length": 64,
                "max_prompt": 48,
                "keep_answers": True,
            },
        }
    )
    summary = run_method_pipeline(mcfg, tmp_path / "run", echo=lambda _s: None)
    stages = [r["stage"] for r in summary["rows"]]
    assert stages[:3] == ["aligned", "finetuned", "resta"] and "antidote" in stages
    resta_row = summary["rows"][2]
    assert resta_row["resta_dropped"] > 0
    assert resta_row["nll_harmful"] != summary["rows"][1]["nll_harmful"]  # RESTA changed the model
    # the post step's point stores every answer and task output like the pipeline's points (rescoring and
    # paired differences read them), and the summary row leaves them out
    import json

    cells = tmp_path / "run" / "cells"
    for point in ("finetuned", "resta"):
        row = json.loads((cells / f"stage=eval__point={point}.json").read_text())
        assert len(row["answers_harmful"]) == 4 and len(row["answers_task"]) == 4, point
    assert not any(k.startswith("answers") for k in resta_row)
