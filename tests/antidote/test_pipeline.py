"""The pipeline: config defaults and validation, a whole run on a tiny model, resume without recomputation."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from robustlab.antidote import pipeline as P
from robustlab.antidote.tiny import TinyModelConfig, tiny_llama, train_tokenizer
from robustlab.errors import UserError

torch.set_num_threads(1)


def test_defaults_are_the_papers():
    cfg = P.PipelineConfig(base="x")
    a, f = cfg.align.train, cfg.finetune.train
    assert (a.mode, a.lr, a.epochs, a.batch_size, a.schedule, a.weight_decay) == (
        "lora",
        1e-3,
        20,
        5,
        "cosine",
        0.1,
    )
    assert (f.mode, f.lr, f.epochs, f.batch_size, f.schedule) == ("lora", 1e-4, 20, 5, "constant")
    assert (f.lora_r, f.lora_alpha, f.lora_targets) == (256, 4, ("q_proj", "k_proj", "v_proj"))
    assert (cfg.data.n, cfg.data.harmful_ratio, cfg.data.n_realign, cfg.data.n_eval_harmful) == (
        5000,
        0.2,
        2000,
        1000,
    )
    assert cfg.realign.mask_ratios == [0.1] and cfg.realign.targets == "auto"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, shared_data):
    from robustlab.antidote.data import load_beavertails, load_task

    texts = [e.text for e in load_beavertails("unsafe_train", shared_data)[:300]]
    texts += [e.text for e in load_task("sst2", "train", shared_data)[:300]]
    tok = train_tokenizer(texts, 400)
    model = tiny_llama(
        tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), 0
    )
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def small_config(base_dir, shared_data, **extra) -> dict:
    cfg = {
        "base": str(base_dir),
        "seed": 1,
        "data": {
            "data_dir": str(shared_data),
            "task": "sst2",
            "n": 40,
            "harmful_ratio": 0.25,
            "n_align": 24,
            "n_realign": 12,
            "n_heldout": 6,
            "n_eval_harmful": 6,
            "n_eval_task": 6,
        },
        "align": {"train": {"mode": "full", "lr": 1e-3, "epochs": 1, "batch_size": 8, "max_length": 64}},
        "finetune": {
            "train": {
                "mode": "lora",
                "lr": 1e-3,
                "epochs": 1,
                "batch_size": 8,
                "max_length": 64,
                "lora_r": 4,
                "lora_alpha": 8,
            }
        },
        "realign": {
            "mask_ratios": [0.1, 0.25],
            "controls": ["random", "benign"],
            "batch_size": 4,
            "max_length": 64,
        },
        "evaluate": {
            "judges": ["refusal"],
            "max_new_tokens_harmful": 4,
            "max_new_tokens_task": 2,
            "batch_size": 8,
            "max_prompt": 48,
            "max_length": 64,
        },
    }
    return P.merge_config(cfg, extra)


def write_cfg(tmp_path, cfg) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_config_errors(tmp_path, base_dir, shared_data):
    good = small_config(base_dir, shared_data)
    assert P.load_config(write_cfg(tmp_path, good)).realign.mask_ratios == [0.1, 0.25]
    with pytest.raises(UserError, match=r"unknown config key\(s\): realign.mask_ratio"):
        P.load_config(write_cfg(tmp_path, P.merge_config(good, {"realign": {"mask_ratio": 0.1}})))
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        P.load_config(write_cfg(tmp_path, P.merge_config(good, {"realign": {"mask_ratios": [0.1, 1.0]}})))
    with pytest.raises(UserError, match="unknown config key"):
        P.load_config(
            write_cfg(tmp_path, P.merge_config(good, {"finetune": {"train": {"learning_rate": 1}}}))
        )
    with pytest.raises(UserError, match="not found"):
        P.load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="base model folder"):
        P.load_config(write_cfg(tmp_path, {**good, "base": str(tmp_path / "nomodel")}))
    with pytest.raises(UserError, match="not a fine-tuning-stage method"):
        P.load_config(write_cfg(tmp_path, P.merge_config(good, {"finetune": {"method": "vaccine"}})))
    with pytest.raises(UserError, match="unknown method"):
        P.load_config(write_cfg(tmp_path, P.merge_config(good, {"align": {"method": "bogus"}})))
    # every registered method of a stage is accepted by the plain pipeline (no table to register it in)
    assert (
        P.load_config(
            write_cfg(tmp_path, P.merge_config(good, {"finetune": {"method": "lisa"}}))
        ).finetune.method
        == "lisa"
    )


@pytest.mark.slow
def test_pipeline_runs_and_resumes_without_recomputing(tmp_path, base_dir, shared_data, monkeypatch):
    from robustlab.antidote import evaluate as E
    from robustlab.antidote import realign as R
    from robustlab.antidote import train as T
    from robustlab.antidote.realign import zeroed_per_row

    cfg = P.load_config(write_cfg(tmp_path, small_config(base_dir, shared_data)))
    out = tmp_path / "run"
    calls = {"eval": 0, "wanda": 0, "train": 0}
    real_eval, real_wanda, real_train = E.evaluate_model, R.collect_statistics, T.train

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(E, "evaluate_model", count("eval", real_eval))
    monkeypatch.setattr(R, "collect_statistics", count("wanda", real_wanda))
    monkeypatch.setattr(T, "train", count("train", real_train))  # what the registry runs for sft
    s1 = P.run_pipeline(cfg, out, echo=lambda *_: None)
    # aligned, finetuned, 3 methods x 2 ratios; one Wanda pass for antidote and one for benign (not per ratio)
    assert calls == {"eval": 8, "wanda": 2, "train": 2}
    stages = [(r["stage"], r["ratio"]) for r in s1["rows"]]
    assert stages[:2] == [("aligned", 0.0), ("finetuned", 0.0)]
    assert {(s, r) for s, r in stages[2:]} == {
        (m, a) for m in ("antidote", "random", "benign") for a in (0.1, 0.25)
    }
    # saved re-aligned adapter: masks with exactly the per-row count, weights zero where masked
    folder = out / "stages" / "realigned-antidote-0.25"
    info = json.loads((folder / "realign.json").read_text())
    assert info["mask_ratio"] == 0.25 and info["saved"] == "adapter"
    from safetensors.torch import load_file

    masks = load_file(str(folder / "realign_mask.safetensors"))
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert masks and all("lora_" in k for k in masks)
    for name, m in masks.items():
        assert (m.sum(dim=1) == zeroed_per_row(m.shape[1], 0.25)).all()
        w = next(v for k, v in weights.items() if k.replace(".weight", "") in name.replace(".default", ""))
        assert torch.all(w[m.bool()] == 0)
    assert (out / "tradeoff.png").is_file() and (out / "results.md").read_text().count("\n") == 10

    # a rerun recomputes nothing and returns the same numbers
    calls.update(eval=0, wanda=0, train=0)
    s2 = P.run_pipeline(cfg, out, echo=lambda *_: None)
    assert calls == {"eval": 0, "wanda": 0, "train": 0}
    assert s2["rows"] == s1["rows"]
    # lose one evaluation: only it is redone, with one fresh score computation for its method
    (out / "cells" / "stage=eval__point=benign__ratio=0.1.json").unlink()
    s3 = P.run_pipeline(cfg, out, echo=lambda *_: None)
    assert calls == {"eval": 1, "wanda": 1, "train": 0}

    def untimed(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert untimed(s3["rows"]) == untimed(s1["rows"])  # same numbers: the evaluation is deterministic
    # another config in the same folder is refused
    other = P.load_config(write_cfg(tmp_path, small_config(base_dir, shared_data, seed=2)))
    with pytest.raises(UserError, match="different configuration"):
        P.run_pipeline(other, out, echo=lambda *_: None)


@pytest.mark.slow
def test_pipeline_protocol_options(tmp_path, base_dir, shared_data):
    """The protocol's options: a pilot stops after the attacked model; controls only at their ratios; grid
    points see the first prompts and rows only; every answer is kept; the alignment adapter is saved."""
    extra = {
        "align": {"train": {"mode": "lora", "lora_r": 4, "lora_alpha": 8}},
        "data": {"n_eval_harmful": 6, "n_eval_task": 6},
        "realign": {"controls": ["random"], "control_ratios": [0.25]},
        "evaluate": {
            "keep_answers": True,
            "n_eval_harmful_grid": 2,
            "n_eval_task_grid": 3,
            "primary_ratios": [0.1],
        },
    }
    pilot = P.load_config(
        write_cfg(
            tmp_path,
            small_config(base_dir, shared_data, **P.merge_config(extra, {"realign": {"skip": True}})),
        )
    )
    s = P.run_pipeline(pilot, tmp_path / "pilot", echo=lambda *_: None)
    assert [r["stage"] for r in s["rows"]] == ["aligned", "finetuned"]
    assert (tmp_path / "pilot" / "stages" / "aligned-adapter" / "adapter_model.safetensors").is_file()
    cfg = P.load_config(write_cfg(tmp_path, small_config(base_dir, shared_data, **extra)))
    rows = {
        (r["stage"], r["ratio"]): r
        for r in P.run_pipeline(cfg, tmp_path / "run", echo=lambda *_: None)["rows"]
    }
    assert set(rows) == {
        ("aligned", 0.0),
        ("finetuned", 0.0),
        ("antidote", 0.1),
        ("antidote", 0.25),
        ("random", 0.25),
    }
    sizes = {k: (r["n_eval_harmful"], r["n_eval_task"]) for k, r in rows.items()}
    assert sizes == {("aligned", 0.0): (6, 6), ("finetuned", 0.0): (6, 6), ("antidote", 0.1): (6, 6),
                     ("antidote", 0.25): (2, 3), ("random", 0.25): (2, 3)}  # fmt: skip
    cell = json.loads((tmp_path / "run" / "cells" / "stage=eval__point=antidote__ratio=0.1.json").read_text())
    assert len(cell["answers_harmful"]) == 6 and len(cell["answers_task"]) == 6
    assert all(len(a) == 2 for a in cell["answers_harmful"])
    assert not any(k.startswith("answers") for r in rows.values() for k in r)  # the summary stays small
