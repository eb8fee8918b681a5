"""Method strings, the pipeline stages of the baselines, and the robustness sweep (smoke scale, real data)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from robustlab.antidote.methods import DefenceParams, MethodSpec, parse_method
from robustlab.errors import UserError

torch.set_num_threads(1)


def test_parse_method_places_names_in_their_stage():
    assert parse_method("sft") == MethodSpec()
    assert parse_method("Vaccine") == MethodSpec(align="vaccine")
    assert parse_method("lisa") == MethodSpec(finetune="lisa")
    assert parse_method("antidote") == MethodSpec(post="antidote")
    vsa = parse_method("vaccine+sft+antidote")
    assert vsa == MethodSpec("vaccine", "sft", "antidote") and vsa.label == "V-S-A"
    assert parse_method("vaccine+lisa+antidote").label == "V-L-A"
    assert parse_method(parse_method("booster+ldifs").name) == MethodSpec("booster", "ldifs")
    for s in ("sft", "repnoise", "ldifs", "safelora", "resta", "vaccine+lisa+resta"):
        assert parse_method(parse_method(s).name).name == parse_method(s).name
    for bad in ("", "bogus", "lisa+sft", "sft+vaccine", "sft+sft+lisa", "a+b+c+d"):
        with pytest.raises(UserError):
            parse_method(bad)


def test_defence_params_validate():
    with pytest.raises(UserError):
        DefenceParams(antidote_ratio=1.5).validate()
    with pytest.raises(UserError):
        DefenceParams(resta_drop_rate=1.0).validate()
    assert DefenceParams().validate().vaccine_rho == 2.0


def test_sweep_cells_share_the_default_cell():
    from robustlab.antidote.sweep import SweepConfig

    cfg = SweepConfig(lrs=(1e-5, 1e-4), epochs=(5, 20), default_lr=1e-4, default_epochs=20)
    assert cfg.cells() == [(1e-4, 20.0), (1e-5, 20.0), (1e-4, 5.0)]
    with pytest.raises(UserError):
        SweepConfig(methods=("sft", "sft")).validate()
    with pytest.raises(UserError):
        SweepConfig(lrs=(0.0,)).validate()


@pytest.mark.integration
def test_tiny_sweep_runs_resumes_and_shares_the_finetuned_model(tmp_path, shared_data):
    from robustlab.antidote.sweep import run_sweep
    from robustlab.antidote.sweep_harness import tiny_harness, tiny_sweep_config
    from robustlab.runs import read_jsonl

    cfg, demo = tiny_sweep_config("smoke")
    # SafeLoRA with threshold -1 never projects: its rows must equal SFT's exactly (same fine-tuned model)
    cfg = dataclasses.replace(
        cfg,
        methods=("sft", "safelora", "vaccine+sft+antidote"),
        lrs=(5e-3,),
        epochs=(1, 2),
        params=dataclasses.replace(cfg.params, safelora_threshold=-1.0),
    )

    def harness(seed, cache, log):
        return tiny_harness(demo, seed, cache, shared_data, log)

    res = run_sweep(cfg, tmp_path / "sw", harness)
    rows = {(r["method"], r["epochs"]): r for r in res["rows"]}
    assert len(rows) == 3 * 2
    for ep in (1.0, 2.0):
        sft, sl = rows[("sft", ep)], rows[("safelora", ep)]
        assert sl["safelora_projected"] == 0 and sl["safelora_layers"] > 0
        for m in ("nll_harmful", "nll_refusal", "refusal_preference", "fa", "hs_refusal"):
            assert sl[m] == pytest.approx(sft[m], rel=1e-6)
        assert rows[("vaccine+sft+antidote", ep)]["zeroed"] > 0
    assert {r["method"] for r in res["references"]} == {"aligned-sft", "aligned-vaccine"}
    tables = (tmp_path / "sw" / "sweep_tables.md").read_text()
    assert "| V-S-A |" in tables and "Epoch sweep" in tables
    trained = [
        m for m in read_jsonl(tmp_path / "sw" / "metrics.jsonl") if m.get("stage") in ("align", "finetune")
    ]
    assert len(trained) == 2 + 2 * 2  # two alignments, two fine-tunes per cell
    # resume: nothing is trained again and the rows are read back unchanged
    again = run_sweep(cfg, tmp_path / "sw", harness)
    trained2 = [
        m for m in read_jsonl(tmp_path / "sw" / "metrics.jsonl") if m.get("stage") in ("align", "finetune")
    ]
    assert len(trained2) == len(trained)
    assert again["rows"] == res["rows"]
