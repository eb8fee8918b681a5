"""The quick demo's path (aligned -> attacked -> Antidote from a cell's LoRA adapters) on a tiny Llama and the
real data: retraining the adapters and starting from them give the same points, Antidote zeroes adapter
weights, the scores are the stored flags' shares, a rerun resumes, and bad cells are one-line errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from robustlab.antidote import finetuned_judge as FJ
from robustlab.antidote import quick_demo as Q
from robustlab.antidote.embedding_judge import beavertails_judge_split
from robustlab.antidote.tiny import TinyModelConfig, tiny_llama, train_tokenizer
from robustlab.errors import UserError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    from robustlab.antidote.data import load_beavertails, load_task

    root = tmp_path_factory.mktemp("quick")
    texts = [e.text for e in load_beavertails("unsafe_train", shared_data)[:300]]
    texts += [e.text for e in load_task("sst2", "train", shared_data)[:300]]
    tok = train_tokenizer(texts, 400)
    model = tiny_llama(
        tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), 0
    )
    model.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    lora = {
        "mode": "lora",
        "lr": 1e-3,
        "epochs": 1,
        "batch_size": 8,
        "max_length": 64,
        "lora_r": 4,
        "lora_alpha": 8,
    }
    record = {
        "base": str(root / "base"),
        "seed": 1,
        "data": {
            "data_dir": str(shared_data),
            "task": "sst2",
            "n": 24,
            "harmful_ratio": 0.25,
            "n_align": 16,
            "n_realign": 8,
            "n_heldout": 4,
            "n_eval_harmful": 6,
            "n_eval_task": 6,
        },
        "align": lora,
        "finetune": lora,
    }
    (root / "adapters.json").write_text(json.dumps(record))
    frozen = {
        "realign": {"mask_ratios": [0.05, 0.2], "batch_size": 4, "max_length": 64},
        "evaluate": {"primary_ratios": [0.2], "max_new_tokens_task": 4, "max_prompt": 48, "max_length": 64},
    }
    (root / "frozen.yaml").write_text(yaml.safe_dump(frozen))
    # a tiny judge in a private cache (the real one takes ~15 min to train)
    rows = beavertails_judge_split(shared_data, seed=0)["train"]
    rows = random.Random(0).sample(rows, 24)
    judge, _ = FJ.train_finetuned_judge(rows, FJ.FineTuneSettings(epochs=1, batch_size=8, max_length=32))
    judge.save(root / "cache" / "judges" / FJ.JUDGE_NAME)
    return root


def demo_cfg(cell, **kw):
    return Q.QuickDemoConfig(cell=str(cell), n_eval_harmful=None, n_eval_task=None, max_new_tokens=8, **kw)


def test_retrained_and_committed_adapters_give_the_same_points(setup, monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(setup / "cache"))
    lines: list[str] = []
    full = Q.run_quick_demo(setup / "full", demo_cfg(setup, retrain=True, n_realign=None), log=lines.append)
    assert [r["stage"] for r in full["rows"]] == list(Q.STAGES)
    assert any("zeroed" in line for line in lines) and full["retrained"]
    # a "committed" cell: the config and the adapters the retraining wrote
    cell = setup / "cell"
    cell.mkdir()
    for name in ("adapters.json", "frozen.yaml"):
        (cell / name).write_text((setup / name).read_text())
    for name in ("aligned", "finetuned"):
        (setup / "full" / "adapters" / name).rename(cell / name)
    quick = Q.run_quick_demo(setup / "quick", demo_cfg(cell, n_realign=None), log=lambda _: None)
    for a, b in zip(full["rows"], quick["rows"], strict=True):
        assert {k: v for k, v in a.items() if "seconds" not in k} == {
            k: v for k, v in b.items() if "seconds" not in k
        }
    points = {s: json.loads((setup / "quick" / "points" / f"{s}.json").read_text()) for s in Q.STAGES}
    for p in points.values():
        flags = [a["harmful"] for a in p["answers_harmful"]]
        assert p["hs_minilm-ft"] == pytest.approx(100 * sum(flags) / len(flags)) and len(flags) == 6
        assert all(
            (a["p_unsafe"] > FJ.load_finetuned_judge().threshold) == a["harmful"]
            for a in p["answers_harmful"]
        )
        assert len(p["answers_task"]) == 6 and 0 <= p["fa"] <= 100
    # Antidote zeroed the top α of each row of every LoRA matrix of the fine-tuning adapter, and nothing else
    from safetensors.torch import load_file

    from robustlab.antidote.realign import zeroed_per_row

    weights = load_file(str(cell / "finetuned" / "adapter_model.safetensors"))
    expected = sum(w.shape[0] * zeroed_per_row(w.shape[1], 0.2) for k, w in weights.items() if "lora_" in k)
    assert points["antidote"]["zeroed"] == expected > 0 and points["antidote"]["mask_ratio"] == 0.2
    assert "zeroed" not in points["attacked"]
    ex = quick["examples"]
    flagged = [i for i, a in enumerate(points["attacked"]["answers_harmful"]) if a["harmful"]]
    assert len(ex) == 3 and [e["prompt"] for e in ex][: len(flagged[:3])] == [
        points["attacked"]["answers_harmful"][i]["prompt"] for i in flagged[:3]
    ]
    # a rerun reads every point back
    stamp = {s: (setup / "quick" / "points" / f"{s}.json").stat().st_mtime_ns for s in Q.STAGES}
    again = Q.run_quick_demo(setup / "quick", demo_cfg(cell, n_realign=None), log=lambda _: None)
    assert again["rows"] == quick["rows"]
    assert stamp == {s: (setup / "quick" / "points" / f"{s}.json").stat().st_mtime_ns for s in Q.STAGES}


def test_demo_section_shows_the_stages_and_examples(setup):
    from robustlab.antidote.reproduce import demo_section

    summary = json.loads((setup / "quick" / "summary.json").read_text())
    from robustlab.report import Report

    report = Report("t")
    report.add(demo_section(summary, "quick", 0))
    md = report.to_markdown()
    for stage in Q.STAGES:
        assert stage in md
    assert "Prompt:" in md and summary["examples"][0]["prompt"][:20] in md


def test_bad_cells_are_user_errors(setup, tmp_path):
    with pytest.raises(UserError, match=r"adapters\.json"):
        Q.run_quick_demo(tmp_path / "o", Q.QuickDemoConfig(cell=str(tmp_path / "none")))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapters.json").write_text((setup / "adapters.json").read_text())
    with pytest.raises(UserError, match="no LoRA adapter"):
        Q.run_quick_demo(tmp_path / "o", Q.QuickDemoConfig(cell=str(tmp_path / "c")))


def test_auto_judge_falls_back_to_the_committed_embedding_judge_when_minilm_ft_is_not_cached(
    setup, tmp_path, monkeypatch
):
    """On an uncached machine the demo must not spend ~45 min training minilm-ft: ``auto`` scores with the
    committed embedding judge, says so, and labels every score with the judge that made it."""
    from robustlab.antidote.embedding_judge import EmbeddingJudge
    from robustlab.antidote.reproduce import demo_section
    from robustlab.claims import results_dir
    from robustlab.report import Report

    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "empty-cache"))
    committed = results_dir("antidote") / "judge" / Q.EMBEDDING_JUDGE
    report = json.loads((results_dir("antidote") / "protocol" / "embedding_judge_report.json").read_text())
    loaded = EmbeddingJudge.load(committed)
    assert loaded.meta["agreement"] == pytest.approx(report["agreement"])
    assert loaded.meta["n_train"] == report["n_train"]
    cell = setup / "cell"  # the committed-style cell of the first test
    lines: list[str] = []
    res = Q.run_quick_demo(tmp_path / "o", demo_cfg(cell, n_realign=None), log=lines.append)
    assert res["judge"] == "embedding" and res["judge_agreement"] == pytest.approx(report["agreement"])
    assert any("minilm-ft judge not cached" in line for line in lines)
    assert not (tmp_path / "empty-cache" / "judges").exists()  # nothing trained
    point = json.loads((tmp_path / "o" / "points" / "attacked.json").read_text())
    raw = [a["prompt"] for a in point["answers_harmful"]]
    answers = [a["answer"] for a in point["answers_harmful"]]
    flags = loaded.harmful(raw, answers)
    assert [a["harmful"] for a in point["answers_harmful"]] == flags
    assert "hs_minilm-ft" not in point and point["hs_embedding"] == pytest.approx(100 * sum(flags) / len(raw))
    rep = Report("t")
    rep.add(demo_section(res, "quick", 0))
    assert "HS embedding %" in rep.to_markdown()
    with pytest.raises(UserError, match="unknown quick-demo judge"):
        Q.run_quick_demo(tmp_path / "p", demo_cfg(cell, judge="beaver"))
