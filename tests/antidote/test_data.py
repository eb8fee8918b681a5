"""Data: templates, loaders on the staged real data, the harmful mix, disjoint slices, GSM8K extraction."""

from __future__ import annotations

import json

import pytest

from robustlab.antidote import data as D
from robustlab.errors import UserError


def test_templates_are_the_official_alpaca_ones():
    p = D.format_prompt("Say hi")
    assert p == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi\n\n### Response:\n"
    )
    q = D.format_prompt(D.SST2_INSTRUCTION, "a fine film")
    assert q.startswith("Below is an instruction that describes a task, paired with an input")
    assert (
        "### Instruction:\nAnalyze the sentiment of the input, and respond only positive or negative\n\n" in q
    )
    assert q.endswith("### Input:\na fine film\n\n### Response:\n")


def test_compact_template_drops_only_the_preamble():
    full = D.format_prompt("Say hi", "ctx")
    short = D.format_prompt("Say hi", "ctx", template="compact")
    assert full.endswith(short) and short.startswith("### Instruction:\nSay hi")
    e = D.Example("q", "", "a", "s", "s:0", template="compact")
    assert e.prompt == "### Instruction:\nq\n\n### Response:\n"
    assert e.with_output("b").template == "compact"


def test_example_text_is_prompt_plus_answer():
    e = D.Example("q", "", "a", "s", "s:0")
    assert e.text == D.format_prompt("q") + "a"


@pytest.mark.parametrize(
    "text,gold",
    [
        ("She pays 3*2=6. The final answer is: 6", "6"),
        ("The final answer is: 1,250 dollars and then 7", "1250"),
        ("no phrase here 4 then 18.0", "18"),
        ("The final answer is -3", "-3"),
        ("nothing", None),
    ],
)
def test_gsm8k_extraction(text, gold):
    assert D.extract_final_number(text) == gold


def test_gsm8k_target_and_gold():
    ans = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72"
    assert D.gsm8k_target(ans).endswith("The final answer is: 72")
    assert D.gsm8k_gold(ans) == "72"
    assert D.label_match("gsm8k", "so The final answer is: 72.", "72")
    assert not D.label_match("gsm8k", "The final answer is: 71", "72")


def test_label_match_is_exact():
    assert D.label_match("sst2", " positive ", "positive")
    assert D.label_match("sst2", "Positive", "positive")
    assert not D.label_match("sst2", "positive!", "positive")
    assert D.label_match("agnews", "sci", "Sci/Tech") and D.label_match("agnews", "World", "World")
    assert not D.label_match("agnews", "World news", "World")


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        D.load_beavertails("unsafe_train", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        D.load_task("sst2", "train", tmp_path / "nope")
    bad = tmp_path / "sst2"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"sentence": "x", "label": 1}\nnot json\n')
    with pytest.raises(UserError, match="line 2"):
        D.load_task("sst2", "train", tmp_path)


def test_assert_disjoint_catches_shared_prompt():
    a = [D.Example("How do I X?", "", "r", "s", "a:0")]
    b = [D.Example("how do  i x?", "", "other", "s", "b:0")]
    with pytest.raises(AssertionError, match="share 1 prompts"):
        D.assert_disjoint({"a": a, "b": b})
    with pytest.raises(AssertionError, match="share 1 examples"):
        D.assert_disjoint({"a": a, "c": list(a)})
    D.assert_disjoint({"a": a, "c": [D.Example("other", "", "r", "s", "c:0")]})


def test_loaders_on_real_data(shared_data):
    assert len(D.load_task("sst2", "test", shared_data)) == 872
    ag = D.load_task("agnews", "test", shared_data)
    assert len(ag) == 1000 and {e.label for e in ag} == set(D.AGNEWS_LABELS)
    gsm = D.load_task("gsm8k", "test", shared_data)
    assert len(gsm) == 1000 and all(e.label and D.extract_final_number(e.output) == e.label for e in gsm[:50])
    alp = D.load_task("alpaca", "test", shared_data)
    assert len(alp) == 104 and alp[0].label is None
    ev = D.load_beavertails("unsafe_test", shared_data)
    assert len(ev) == 1000


def test_harmful_mix_sizes_and_disjointness(shared_data):
    d = D.build_harmful_finetuning(
        "sst2",
        n=500,
        harmful_ratio=0.2,
        n_align=300,
        n_realign=200,
        n_heldout=50,
        n_eval_harmful=100,
        n_eval_task=100,
        align_with_refusals=True,
        data_dir=shared_data,
        seed=3,
    )
    harmful = [e for e in d.finetune if e.source.startswith("beavertails")]
    assert len(d.finetune) == 500 and len(harmful) == 100
    assert len(d.realign) == 200 and len(d.heldout_harmful) == 50 and len(d.eval_harmful) == 100
    assert len(d.alignment) == 300  # refusals only: n_align of them, no room left for safe pairs
    # independent check of disjointness on normalised prompts
    norm = {
        k: {" ".join(e.instruction.lower().split()) for e in v}
        for k, v in {
            "attack": harmful,
            "realign": d.realign,
            "held": d.heldout_harmful,
            "eval": d.eval_harmful,
        }.items()
    }
    names = list(norm)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not norm[a] & norm[b], (a, b)
    benign = [e for e in d.finetune if e.source == "sst2"]
    assert not {e.uid for e in benign} & {e.uid for e in d.benign_calibration}
    assert all(e.source == "refusal" and e.output in D.REFUSALS for e in d.alignment)
    # same seed, same slices; another seed, other slices
    d2 = D.build_harmful_finetuning(
        "sst2",
        n=500,
        harmful_ratio=0.2,
        n_align=300,
        n_realign=200,
        n_heldout=50,
        n_eval_harmful=100,
        n_eval_task=100,
        data_dir=shared_data,
        seed=3,
    )
    assert [e.uid for e in d2.finetune] == [e.uid for e in d.finetune]
    d3 = D.build_harmful_finetuning(
        "sst2",
        n=500,
        harmful_ratio=0.2,
        n_align=300,
        n_realign=200,
        n_heldout=50,
        n_eval_harmful=100,
        n_eval_task=100,
        data_dir=shared_data,
        seed=4,
    )
    assert [e.uid for e in d3.realign] != [e.uid for e in d.realign]


def test_harmful_mix_too_large_is_a_user_error(shared_data):
    with pytest.raises(UserError, match="harmful pool"):
        D.build_harmful_finetuning("sst2", n=5000, harmful_ratio=1.0, data_dir=shared_data)
    with pytest.raises(UserError, match="outside"):
        D.build_harmful_finetuning("sst2", harmful_ratio=1.5, data_dir=shared_data)


def test_check_slices_rejects_a_leak(tmp_path):
    rows = [{"prompt": f"harm {i}", "response": f"ans {i}", "source_index": i} for i in range(40)]
    (tmp_path / "beavertails").mkdir()
    for name in ("unsafe_train", "unsafe_test_prompts"):
        with open(tmp_path / "beavertails" / f"{name}.jsonl", "w") as f:
            for r in rows:  # evaluation prompts equal to training prompts: must be caught
                f.write(json.dumps(r) + "\n")
    (tmp_path / "sst2").mkdir()
    for split in ("train", "validation"):
        with open(tmp_path / "sst2" / f"{split}.jsonl", "w") as f:
            for i in range(30):
                f.write(json.dumps({"sentence": f"{split} s{i}", "label": i % 2, "source_index": i}) + "\n")
    with pytest.raises(AssertionError, match="share"):
        D.build_harmful_finetuning(
            "sst2",
            n=10,
            harmful_ratio=0.5,
            n_align=5,
            n_realign=5,
            n_heldout=5,
            align_with_safe_pairs=False,
            n_benign_calibration=5,
            data_dir=tmp_path,
        )


def _hub_from_staged(shared_data, monkeypatch):
    """Serve the staged complete 30k_test split (3,021 rows, 2,526 unique prompts) as both BeaverTails hub
    splits, and the staged SST-2 files as the hub's: the repeats of real BeaverTails, offline."""
    full = [json.loads(x) for x in (shared_data / "beavertails" / "test_30k.jsonl").open()]
    sst2 = {
        s: [json.loads(x) for x in (shared_data / "sst2" / f"{s}.jsonl").open()]
        for s in ("train", "validation")
    }

    def fake_hub(name, split, config=None):
        if name == "PKU-Alignment/BeaverTails":
            return [{k: r[k] for k in ("prompt", "response", "is_safe")} for r in full]
        assert name == "sst2"
        return [{"sentence": r["sentence"], "label": r["label"]} for r in sst2[split]]

    monkeypatch.setattr(D, "_hub", fake_hub)
    return full


def test_hub_beavertails_pools_have_unique_prompts_disjoint_from_the_evaluation(shared_data, monkeypatch):
    full = _hub_from_staged(shared_data, monkeypatch)
    assert len(full) == 3021 and len({r["prompt"] for r in full}) == 2526  # 2,525 once normalised
    evaluation = D.load_beavertails("unsafe_test", "hub")
    staged = D.load_beavertails("unsafe_test", shared_data)
    assert [e.instruction for e in evaluation] == [
        e.instruction for e in staged
    ]  # the protocol, repeats kept
    eval_prompts = {D.normalise(e.instruction) for e in evaluation}
    for part in ("unsafe_train", "safe"):
        pool = D.load_beavertails(part, "hub")
        prompts = [D.normalise(e.instruction) for e in pool]
        assert len(prompts) == len(set(prompts)) and not set(prompts) & eval_prompts
    # the whole slicing runs (before: duplicate prompts across the attack and re-alignment slices asserted)
    data = D.build_harmful_finetuning(
        "sst2",
        n=200,
        n_align=100,
        n_realign=100,
        n_heldout=20,
        n_eval_harmful=50,
        n_eval_task=20,
        data_dir="hub",
    )
    assert len(data.realign) == 100 and {e.source for e in data.alignment} == {"beavertails_safe"}


def test_default_alignment_set_is_the_papers_safe_pairs_and_refusals_are_an_option(shared_data):
    kw = dict(
        n=100, n_align=50, n_realign=20, n_heldout=10, n_eval_harmful=20, n_eval_task=20, data_dir=shared_data
    )
    paper = D.build_harmful_finetuning("sst2", **kw)
    safe = {e.uid for e in D.load_beavertails("safe", shared_data)}
    assert len(paper.alignment) == 50 and all(e.uid in safe for e in paper.alignment)
    templated = D.build_harmful_finetuning("sst2", align_with_refusals=True, **kw)
    assert len(templated.alignment) == 50 and all(e.output in D.REFUSALS for e in templated.alignment)
    # the harmful pairs RepNoise and Booster train against are the same either way and outside every slice
    assert [e.uid for e in paper.harmful_aux] == [e.uid for e in templated.harmful_aux]
    used = {e.uid for e in paper.finetune + paper.realign + paper.heldout_harmful + paper.eval_harmful}
    assert paper.harmful_aux and not {e.uid for e in paper.harmful_aux} & used
