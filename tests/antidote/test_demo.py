"""The offline demo end to end at its ``smoke`` scale (every code path in seconds; its numbers mean nothing):
seeds in worker processes give the same numbers as seeds in turn, every point is there with the masks the
ratios ask for, a second call recomputes nothing, and the pretraining corpus is disjoint from every seed's
harmful slices."""

from __future__ import annotations

import pytest
import torch

from robustlab.antidote.data import normalise
from robustlab.antidote.demo import _point_keys, run_demo
from robustlab.antidote.demo_report import STAGES
from robustlab.antidote.tiny import demo_config, demo_slices, pretraining_docs
from robustlab.runs import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MEASURES = ("hs_refusal", "fa", "nll_harmful", "nll_refusal", "refusal_preference")


@pytest.fixture(scope="module")
def two_seed_runs(tmp_path_factory, shared_data):
    cfg = demo_config("smoke")
    cfg.seeds = (0, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run one thread each: same float summation order
    try:
        out_seq = tmp_path_factory.mktemp("demo_seq")
        seq = run_demo(out_seq, "smoke", cfg=cfg, data_dir=shared_data, workers=1)
        out_par = tmp_path_factory.mktemp("demo_par")
        par = run_demo(
            out_par, "smoke", cfg=demo_config("smoke"), seeds=(0, 1), data_dir=shared_data, workers=2
        )
    finally:
        torch.set_num_threads(threads)
    return cfg, (out_seq, seq), (out_par, par)


def test_parallel_seeds_equal_sequential(two_seed_runs):
    _, (_, seq), (_, par) = two_seed_runs
    key = lambda r: (r["seed"], r["mode"], r["stage"], r["ratio"])  # noqa: E731
    a, b = sorted(seq["rows"], key=key), sorted(par["rows"], key=key)
    assert [key(r) for r in a] == [key(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for m in MEASURES:
            assert ra.get(m) == pytest.approx(rb.get(m), rel=1e-5, abs=1e-6), (key(ra), m)


def test_every_point_with_the_masks_its_ratio_asks_for(two_seed_runs):
    cfg, _, (out, res) = two_seed_runs
    assert len(res["rows"]) == sum(len(_point_keys(cfg, s)) for s in cfg.seeds)
    assert {r["stage"] for r in res["rows"]} == set(STAGES)
    for mode in cfg.modes:
        for ratio in cfg.ratios_lora if mode == "lora" else cfg.ratios_full:
            for seed in cfg.seeds:
                zeroed = {
                    r["stage"]: r["zeroed"]
                    for r in res["rows"]
                    if r["mode"] == mode and r["ratio"] == ratio and r["seed"] == seed
                }
                # Antidote and both controls prune the same number of weights at the same ratio
                assert set(zeroed) == {"antidote", "random", "benign"}
                assert len(set(zeroed.values())) == 1 and zeroed["antidote"] > 0
    assert all(row["seeds"] == 2 for row in res["aggregate"])
    assert (out / "antidote_tradeoff.png").stat().st_size > 0


def test_second_call_recomputes_nothing(two_seed_runs, shared_data):
    _, _, (out, first) = two_seed_runs
    lines = len(read_jsonl(out / "metrics.jsonl"))
    again = run_demo(out, "smoke", cfg=demo_config("smoke"), seeds=(0, 1), data_dir=shared_data, workers=2)
    assert len(read_jsonl(out / "metrics.jsonl")) == lines
    assert again["rows"] == first["rows"]


def test_pretraining_corpus_is_disjoint_from_every_seeds_harmful_slices(shared_data):
    cfg = demo_config("smoke")
    cfg.n_pretrain_docs = 10**9  # the whole pool, not a sample of it
    slices = [demo_slices(cfg, s, shared_data) for s in (0, 1)]
    docs = {normalise(d.output.split("\n", 1)[0]) for d in pretraining_docs(cfg, slices, 0, shared_data)}
    for data in slices:
        held = data.realign + data.heldout_harmful + data.eval_harmful
        assert not {normalise(e.instruction) for e in held} & docs
