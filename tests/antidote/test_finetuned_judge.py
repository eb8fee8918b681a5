"""The fine-tuned MiniLM judge (minilm-ft): split disjoint by prompt on the real data, metrics against brute
force, deterministic training and an exact save/load round trip on a tiny run, the cached judge against its
recorded held-out probabilities, and bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.antidote import finetuned_judge as FJ
from robustlab.antidote.embedding_judge import beavertails_judge_split
from robustlab.cli import main
from robustlab.errors import UserError

torch.set_num_threads(1)


def REPORT_DATA() -> bool:
    from robustlab.paths import shared_data_dir

    return shared_data_dir() is not None


REPORT = Path(__file__).resolve().parents[2] / "results" / "antidote" / "judge" / "judge_report.json"


def norm(s: str) -> str:
    return " ".join(s.strip().lower().split())


def test_split_and_validation_fold_are_disjoint_by_prompt(shared_data):
    split = beavertails_judge_split(shared_data, seed=0)
    prompts = {k: {norm(r["prompt"]) for r in v} for k, v in split.items()}
    assert not prompts["train"] & prompts["heldout"]
    assert not (prompts["train"] | prompts["heldout"]) & prompts["eval"]
    fit, val = FJ.validation_split(split["train"], seed=0)
    assert len(fit) + len(val) == len(split["train"]) and len(val) > 200
    assert not {norm(r["prompt"]) for r in fit} & {norm(r["prompt"]) for r in val}
    assert {r["is_safe"] for r in val} == {True, False}


def test_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40).astype(bool)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 40), 0, 1)
    got = FJ.judge_metrics(y.tolist(), p.tolist(), 0.5)
    pred = p > 0.5
    assert got["agreement"] == pytest.approx(np.mean(pred == y))
    tpr, tnr = np.mean(pred[y]), np.mean(~pred[~y])
    assert got["balanced_accuracy"] == pytest.approx((tpr + tnr) / 2)
    # AUC: the share of (unsafe, safe) pairs ranked correctly, ties counting half
    pairs = list(itertools.product(p[y], p[~y]))
    auc = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert got["auc"] == pytest.approx(auc)


@pytest.fixture(scope="module")
def tiny_rows(shared_data):
    rows = beavertails_judge_split(shared_data, seed=0)["train"]
    safe = [r for r in rows if r["is_safe"]][:10]
    unsafe = [r for r in rows if not r["is_safe"]][:10]
    return safe + unsafe


def test_training_is_deterministic_and_save_load_is_exact(tiny_rows, tmp_path):
    s = FJ.FineTuneSettings(epochs=1, batch_size=8, max_length=32, seed=3)
    held = tiny_rows[::3]
    a, hist = FJ.train_finetuned_judge(tiny_rows, s, validation=held)
    b, _ = FJ.train_finetuned_judge(tiny_rows, s)
    assert a.weights_sha256() == b.weights_sha256()
    c, _ = FJ.train_finetuned_judge(
        tiny_rows, FJ.FineTuneSettings(epochs=1, batch_size=8, max_length=32, seed=4)
    )
    assert c.weights_sha256() != a.weights_sha256()
    p, r = [x["prompt"] for x in held], [x["response"] for x in held]
    prob = a.probability(p, r)
    assert np.allclose(prob, hist[0]["probabilities"], atol=1e-12) and ((prob > 0) & (prob < 1)).all()
    a.save(tmp_path / "judge", {"note": "tiny"})
    again = FJ.load_finetuned_judge(tmp_path / "judge")
    np.testing.assert_array_equal(again.probability(p, r), prob)
    assert again.harmful(p, r) == [bool(x > 0.5) for x in prob] and again.harmful([], []) == []
    assert again.weights_sha256() == again.meta["weights_sha256"] == a.weights_sha256()
    with pytest.raises(UserError, match="responses"):
        again.harmful(p, r[:-1])


def test_bad_input_is_a_user_error(tiny_rows, tmp_path):
    with pytest.raises(UserError, match="both"):
        FJ.train_finetuned_judge([r for r in tiny_rows if r["is_safe"]], FJ.FineTuneSettings(epochs=1))
    for bad in ({"pooling": "max"}, {"lr": 0.0}, {"threshold": 1.0}, {"epochs": 0}):
        with pytest.raises(UserError):
            FJ.FineTuneSettings(**bad).check()
    with pytest.raises(UserError, match="robustlab antidote judge train"):
        FJ.load_finetuned_judge(tmp_path / "nothing")


def test_missing_judge_on_the_command_line_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    code = main(["antidote", "judge", "check"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "robustlab antidote judge train" in err[0], err
    code = main(["antidote", "judge", "train", "--threads", "0"])
    assert code == 2 and "--threads" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_pipeline_knows_the_judge_by_name(tmp_path, monkeypatch):
    from robustlab.antidote.pipeline import JUDGES, make_judges

    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path))
    assert FJ.JUDGE_NAME in JUDGES
    with pytest.raises(UserError, match="judge train"):
        make_judges([FJ.JUDGE_NAME])


@pytest.mark.skipif(not REPORT.is_file(), reason="no committed judge report")
def test_committed_report_is_consistent():
    rep = json.loads(REPORT.read_text())
    sp = rep["split"]
    assert set(sp["prompt_overlap"].values()) == {0}
    probs = np.asarray(rep["heldout_probabilities"])
    assert (
        len(probs) == sp["heldout_pairs"] == 364
        and sp["fit_pairs"] + sp["validation_pairs"] == sp["train_pairs"]
    )
    # the recorded agreement is the one its recorded probabilities give against the labels
    held = beavertails_judge_split(None, seed=rep["settings"]["seed"])["heldout"] if REPORT_DATA() else None
    if held is not None:
        got = FJ.judge_metrics([not r["is_safe"] for r in held], probs, rep["chosen"]["threshold"])
        assert got["agreement"] == pytest.approx(rep["heldout"][FJ.JUDGE_NAME]["agreement"], abs=1e-9)
    # the library defaults are the committed judge's settings (epoch and threshold are then chosen on validation)
    assert rep["settings"] == {**FJ.FineTuneSettings().__dict__, "seed": rep["settings"]["seed"]}
    assert (
        rep["chosen"]["threshold"] in FJ.THRESHOLDS
        and 1 <= rep["chosen"]["epoch"] <= rep["settings"]["epochs"]
    )


def test_cached_judge_reproduces_its_recorded_heldout_probabilities(shared_data):
    """The judge that `robustlab antidote judge train` cached (skipped where it has not been trained): its
    probabilities on the first held-out pairs equal the committed report's, so the cache is that judge."""
    if not (FJ.default_judge_dir() / "judge.json").is_file() or not REPORT.is_file():
        pytest.skip("no cached minilm-ft judge (robustlab antidote judge train) or no committed report")
    rep = json.loads(REPORT.read_text())
    got = FJ.check_judge(None, shared_data, limit=48)
    np.testing.assert_allclose(got["probabilities"], rep["heldout_probabilities"][:48], atol=1e-5)
