"""The training loop under a Runtime: low-precision autocast with float32 adapters, gradient checkpointing
that changes memory but not the result, batches on the model's device."""

from __future__ import annotations

import pytest
import torch

from robustlab.antidote.runtime import Runtime
from robustlab.antidote.tiny import TinyModelConfig, tiny_llama, train_tokenizer
from robustlab.antidote.train import TrainConfig, response_loss, train
from robustlab.errors import UserError

torch.set_num_threads(1)


class Ex:
    def __init__(self, prompt: str, output: str) -> None:
        self.prompt, self.output = prompt, output


CORPUS = [f"question {i}: what is {i} plus one? answer: {i + 1} ." for i in range(40)]
EXAMPLES = [Ex(f"question {i}: what is {i} plus one? answer:", f" {i + 1} .") for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 200)


def model(tok):
    return tiny_llama(
        tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), 0
    )


def config(**kw):
    settings = {"mode": "lora", "lr": 1e-2, "epochs": 2, "batch_size": 4, "lora_r": 4, "lora_alpha": 8}
    return TrainConfig(**{**settings, "max_length": 32, **kw})


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_training(tok, mode):
    """Recomputing activations in the backward pass must not change a single step (same losses, same
    weights), only memory."""
    a, ra = train(model(tok), tok, EXAMPLES, config(mode=mode))
    b, rb = train(model(tok), tok, EXAMPLES, config(mode=mode, gradient_checkpointing=True))
    assert ra.steps == rb.steps == 6
    torch.testing.assert_close(torch.tensor(ra.losses), torch.tensor(rb.losses), rtol=1e-5, atol=1e-6)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)
    assert not b.base_model.is_gradient_checkpointing if mode == "lora" else not b.is_gradient_checkpointing


def test_bfloat16_runtime_autocasts_the_forward_and_keeps_float32_adapters(tok):
    seen = []

    def loss_fn(m, batch):
        seen.append((batch["input_ids"].device.type, m(input_ids=batch["input_ids"]).logits.dtype))
        return response_loss(m, batch)

    rt = Runtime.resolve("cpu", "bfloat16")
    trained, result = train(model(tok), tok, EXAMPLES, config(), loss_fn=loss_fn, runtime=rt)
    assert seen and all(s == ("cpu", torch.bfloat16) for s in seen)
    lora = {p.dtype for n, p in trained.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in trained.named_parameters() if "lora_" not in n}
    assert lora == {torch.float32} and base == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]  # it still learns in bf16


def test_float32_runtime_is_the_plain_loop(tok):
    _, plain = train(model(tok), tok, EXAMPLES, config())
    _, cpu = train(model(tok), tok, EXAMPLES, config(), runtime=Runtime.cpu())
    assert plain.losses == cpu.losses


def test_gradient_checkpointing_on_a_model_without_it_is_a_user_error(tok):
    class Plain(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(UserError, match="gradient checkpointing"):
        train(Plain(), tok, EXAMPLES, config(mode="full", gradient_checkpointing=True))


def test_evaluation_under_a_bfloat16_runtime_stays_close_to_float32(tok):
    """NLLs read from a bf16-autocast forward agree with float32 to bf16 precision; generation runs and
    returns one answer per prompt in the input order."""
    from robustlab.antidote.evaluate import answer_token_nlls, generate

    trained, _ = train(model(tok), tok, EXAMPLES, config())
    prompts, answers = [e.prompt for e in EXAMPLES[:4]], [e.output for e in EXAMPLES[:4]]
    fp32 = answer_token_nlls(trained, tok, prompts, answers, runtime=Runtime.cpu())
    bf16 = answer_token_nlls(trained, tok, prompts, answers, runtime=Runtime.resolve("cpu", "bfloat16"))
    assert [len(a) for a in fp32] == [len(b) for b in bf16]
    flat32, flat16 = (torch.tensor([x for row in rows for x in row]) for rows in (fp32, bf16))
    assert flat16.dtype == torch.float32 and not torch.equal(flat32, flat16)  # really computed in bf16
    torch.testing.assert_close(flat16, flat32, rtol=0.05, atol=0.05)
    out = generate(trained, tok, prompts, max_new_tokens=4, runtime=Runtime.resolve("cpu", "bf16"))
    assert len(out) == 4 and out == generate(
        trained, tok, prompts, max_new_tokens=4, runtime=Runtime.resolve("cpu", "bf16")
    )
