"""Evaluation: NLL measures against an independent computation, batched left-padded greedy generation
against one-at-a-time greedy decoding, harmful score and finetune accuracy."""

from __future__ import annotations

import pytest
import torch

from robustlab.antidote.data import Example
from robustlab.antidote.evaluate import (
    answer_nll,
    evaluate_model,
    finetune_accuracy,
    generate,
    harmful_score,
    likelihood_measures,
)
from robustlab.antidote.tiny import TinyModelConfig, tiny_llama, train_tokenizer

torch.set_num_threads(1)
CORPUS = [
    f"question {i}: what is {i} plus one? answer: {i + 1} . I'm sorry, I cannot help." for i in range(60)
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), 0)
    return m.eval()


def _reference_nll(model, tok, prompt, answer, first=None):
    """Independent: BOS + prompt tokens, then answer tokens + EOS, scored one sequence at a time."""
    p = tok(prompt)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    a = a[:first] if first else a
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return -sum(float(logp[len(p) - 1 + k, tok_id]) for k, tok_id in enumerate(a)) / len(a)


def test_answer_nll_matches_reference(model, tok):
    prompts = ["question 1: what is", "question 12: what is 12 plus one? answer:", "the cat"]
    answers = [" 2", " 13 . the end", " sat on the mat"]
    got = answer_nll(model, tok, prompts, answers, batch_size=2)
    want = [_reference_nll(model, tok, p, a) for p, a in zip(prompts, answers, strict=True)]
    assert got == pytest.approx(want, rel=1e-4)


def test_likelihood_measures(model, tok):
    held = [Example(f"question {i}: what is", "", f" {i + 1} plus more", "bt", f"h:{i}") for i in range(5)]
    refusal = "I'm sorry, I cannot help."
    lm = likelihood_measures(model, tok, held, refusal=refusal, batch_size=3)
    harm = [_reference_nll(model, tok, e.prompt, e.output) for e in held]
    ref = [_reference_nll(model, tok, e.prompt, refusal) for e in held]
    assert lm.nll_harmful == pytest.approx(sum(harm) / 5, rel=1e-4)
    assert lm.nll_refusal == pytest.approx(sum(ref) / 5, rel=1e-4)
    assert lm.refusal_preference == pytest.approx(
        100 * sum(r < h for r, h in zip(ref, harm, strict=True)) / 5
    )
    h3 = [_reference_nll(model, tok, e.prompt, e.output, 3) for e in held]
    r3 = [_reference_nll(model, tok, e.prompt, refusal, 3) for e in held]
    assert lm.refusal_preference_start == pytest.approx(
        100 * sum(r < h for r, h in zip(r3, h3, strict=True)) / 5
    )


def test_answer_nll_first_tokens(model, tok):
    prompts, answers = ["question 1: what is", "the cat"], [" 2 plus 3 is 5", " sat on the mat"]
    got = answer_nll(model, tok, prompts, answers, first_tokens=2)
    want = [_reference_nll(model, tok, p, a, 2) for p, a in zip(prompts, answers, strict=True)]
    assert got == pytest.approx(want, rel=1e-4)


def _greedy_one(model, tok, prompt, n):
    ids = tok(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_batched_left_padded_generation_equals_single(model, tok):
    prompts = ["question 1", "question 12: what is 12 plus one? answer:", "the", "I'm sorry, I cannot"]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = [_greedy_one(model, tok, p, 6) for p in prompts]
    assert batched == single


class FlagAll:
    def harmful(self, prompts, responses):
        return [("sorry" not in r.lower()) for r in responses]


def test_harmful_score_and_accuracy():
    assert harmful_score(FlagAll(), ["a", "b", "c", "d"], ["ok", "Sorry no", "sure", "x"]) == 75.0
    ex = [
        Example("i", "x", "positive", "sst2", f"s:{i}", lab) for i, lab in enumerate(["positive", "negative"])
    ]
    assert finetune_accuracy("sst2", ["positive", "negative."], ex) == 50.0
    assert finetune_accuracy("alpaca", ["x"], [Example("i", "", "o", "alpaca", "a:0")]) is None


def test_evaluate_model_keys(model, tok):
    harm = [Example(f"question {i}", "", f" {i}", "bt", f"e:{i}") for i in range(3)]
    task = [Example("question", "x", "positive", "sst2", f"t:{i}", "positive") for i in range(2)]
    from robustlab.antidote.evaluate import EvalSettings

    m = evaluate_model(
        model, tok, "sst2", harm, task, harm, {"flag": FlagAll()}, EvalSettings(4, 3, 2, 32, 48)
    )
    assert {"hs_flag", "fa", "nll_harmful", "nll_refusal", "refusal_preference"} <= set(m)
