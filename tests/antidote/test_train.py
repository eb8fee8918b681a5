"""The training loop: loss only on response tokens (hand computation), it learns, determinism, LoRA/full."""

from __future__ import annotations

import math

import pytest
import torch

from robustlab.antidote.tiny import TinyModelConfig, tiny_llama, train_tokenizer
from robustlab.antidote.train import (
    IGNORE_INDEX,
    TrainConfig,
    _lr_lambda,
    collate,
    encode_example,
    pad_id,
    response_loss,
    train,
    with_overrides,
)
from robustlab.errors import UserError

torch.set_num_threads(1)


class Ex:
    def __init__(self, prompt: str, output: str) -> None:
        self.prompt, self.output = prompt, output


CORPUS = [f"question {i}: what is {i} plus one? answer: {i + 1} . the cat sat on the mat" for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 300)


def small_model(tok, seed=0):
    return tiny_llama(
        tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), seed
    )


def test_encode_masks_the_prompt(tok):
    ids, labels = encode_example(tok, "question 3: what", " is 4", 64)
    p = tok("question 3: what")["input_ids"]  # with BOS
    assert ids[: len(p)] == p
    assert labels[: len(p)] == [IGNORE_INDEX] * len(p)
    assert labels[len(p) :] == ids[len(p) :] and ids[-1] == tok.eos_token_id


def test_encode_truncation_keeps_response_cue(tok):
    long_prompt = " ".join(["cat"] * 200) + " ### Response:\n"
    ids, labels = encode_example(tok, long_prompt, "answer 4", 40)
    assert len(ids) <= 40
    tail = tok(" ### Response:\n", add_special_tokens=False)["input_ids"]
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    assert ids[:n_prompt][-len(tail) :] == tail[-min(8, len(tail)) :] or n_prompt >= len(tail)


def test_response_loss_matches_hand_computation(tok):
    model = small_model(tok)
    feats = [
        encode_example(tok, "question 1: what is", " 2 .", 64),
        encode_example(tok, "question 22: what is 22 plus one?", " answer: 23", 64),
    ]
    batch = collate(feats, pad_id(tok))
    loss = float(response_loss(model, batch))
    # independent: each example alone, no padding, sum of -log p over answer tokens / their count
    total, count, full_total, full_count = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for ids, labels in feats:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                full_total -= float(logp[t - 1, ids[t]])
                full_count += 1
                if labels[t] != IGNORE_INDEX:
                    total -= float(logp[t - 1, ids[t]])
                    count += 1
    assert count == sum(len([x for x in lab if x != IGNORE_INDEX]) for _, lab in feats)
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert abs(loss - full_total / full_count) > 1e-3  # the prompt tokens really are left out


def test_training_reduces_loss_and_only_learns_answers(tok):
    model = small_model(tok)
    exs = [Ex(f"question {i}: what is {i} plus one?", f" answer: {i + 1}") for i in range(20)]
    cfg = TrainConfig(
        mode="full", lr=3e-3, epochs=8, batch_size=4, schedule="constant", max_length=48, seed=1
    )
    before = float(
        response_loss(model, collate([encode_example(tok, e.prompt, e.output, 48) for e in exs], 0))
    )
    model, res = train(model, tok, exs, cfg)
    after = float(
        response_loss(model, collate([encode_example(tok, e.prompt, e.output, 48) for e in exs], 0))
    )
    assert res.steps == 40 and len(res.losses) == 40
    assert after < 0.5 * before
    # gradients flow only from answer tokens: a batch whose answers are empty except EOS has loss on EOS only
    feats = [encode_example(tok, e.prompt, "", 48) for e in exs[:3]]
    assert all(sum(x != IGNORE_INDEX for x in lab) == 1 for _, lab in feats)


def test_training_is_deterministic_by_seed(tok):
    exs = [Ex(f"question {i}: what is", f" {i + 1}") for i in range(12)]
    cfg = TrainConfig(mode="full", lr=1e-3, epochs=2, batch_size=5, max_length=32, seed=7)
    m1, r1 = train(small_model(tok), tok, exs, cfg)
    m2, r2 = train(small_model(tok), tok, exs, cfg)
    assert r1.losses == r2.losses
    assert all(
        torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    _, r3 = train(small_model(tok), tok, exs, TrainConfig(**{**cfg.__dict__, "seed": 8}))
    assert r3.losses != r1.losses


def test_lora_trains_only_the_adapter(tok):
    model = small_model(tok)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    exs = [Ex(f"question {i}: what is", f" {i + 1}") for i in range(10)]
    cfg = TrainConfig(
        mode="lora", lr=5e-3, epochs=3, batch_size=5, max_length=32, lora_r=4, lora_alpha=8, seed=0
    )
    peft_model, res = train(model, tok, exs, cfg)
    assert res.losses[-1] < res.losses[0]
    sd = peft_model.state_dict()
    lora = [k for k in sd if "lora_" in k]
    assert lora and all(("q_proj" in k or "k_proj" in k or "v_proj" in k) for k in lora)
    for k, v in base.items():
        key = next(s for s in sd if s.endswith(k.replace(".weight", ".base_layer.weight")) or s.endswith(k))
        assert torch.equal(sd[key], v), k
    assert any(not torch.all(sd[k] == 0) for k in lora if "lora_B" in k)  # B moved off its zero init


def test_unknown_lora_target_is_a_user_error(tok):
    with pytest.raises(UserError, match="not found"):
        train(
            small_model(tok),
            tok,
            [Ex("q", "a")],
            TrainConfig(mode="lora", lora_targets=("c_attn",), epochs=1),
        )


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError):
        TrainConfig(mode="qlora").validate()
    with pytest.raises(UserError, match="unknown training setting"):
        with_overrides(TrainConfig(), learning_rate=1.0)
    assert with_overrides(TrainConfig(), lr=0.5, lora_targets=["q_proj"]).lora_targets == ("q_proj",)


def test_schedules():
    f = _lr_lambda("cosine", 10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert _lr_lambda("constant", 10, 100)(0) == 1.0
    assert _lr_lambda("linear", 0, 100)(50) == pytest.approx(0.5)
