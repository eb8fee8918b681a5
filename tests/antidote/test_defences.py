"""The baselines' defining computations on a tiny Llama, each against an independent calculation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from robustlab.antidote.defences.booster import BoosterLoss
from robustlab.antidote.defences.common import BatchStream, find_modules
from robustlab.antidote.defences.ldifs import LDIFSLoss, train_ldifs
from robustlab.antidote.defences.lisa import LisaLoss, train_lisa
from robustlab.antidote.defences.repnoise import masked_ce, mmd_rbf, repnoise_terms, train_repnoise
from robustlab.antidote.defences.resta import dare, resta
from robustlab.antidote.defences.safelora import projection_matrix, safelora
from robustlab.antidote.defences.vaccine import VaccineLoss, train_vaccine
from robustlab.antidote.tiny import TinyModelConfig, tiny_llama, train_tokenizer
from robustlab.antidote.train import TrainConfig, add_lora, collate, encode_example, pad_id, response_loss
from robustlab.errors import UserError

torch.set_num_threads(1)


class Ex:
    def __init__(self, prompt: str, output: str) -> None:
        self.prompt, self.output = prompt, output


CORPUS = [f"question {i}: what is {i} plus one? answer: {i + 1} . the cat sat on the mat" for i in range(60)]
SAFE = [Ex(f"question {i}: what is {i} plus one?", f" answer: {i + 1}") for i in range(12)]
HARM = [Ex(f"question {i}: what is {i} plus one?", " the cat sat on the mat") for i in range(12, 24)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 300)


def small_model(tok, seed=0):
    return tiny_llama(
        tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), seed
    )


def batch_of(tok, examples, max_length=48):
    return collate([encode_example(tok, e.prompt, e.output, max_length) for e in examples], pad_id(tok))


def tiny_cfg(**kw):
    base = dict(mode="full", lr=1e-3, epochs=1, batch_size=4, max_length=48, seed=0)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- Vaccine


def test_vaccine_perturbation_has_norm_rho_and_follows_the_output_gradient(tok):
    model = small_model(tok)
    batch = batch_of(tok, SAFE[:4])
    rho = 2.0
    loss_fn = VaccineLoss(rho)
    loss_fn(model, batch)
    eps = loss_fn.last_perturbation
    attn = find_modules(model, "attention")
    assert set(eps) == {n for n, _ in attn} and len(eps) == 2
    total = math.sqrt(sum(float((e.double() ** 2).sum()) for e in eps.values()))
    assert total == pytest.approx(rho, rel=1e-5)
    # independent: gradients w.r.t. the attention outputs from full backward hooks (the official mechanism)
    grads = {}
    hooks = [
        m.register_full_backward_hook(lambda mod, gi, go, n=n: grads.__setitem__(n, go[0].detach().clone()))
        for n, m in attn
    ]
    model.zero_grad()
    response_loss(model, batch).backward()
    for h in hooks:
        h.remove()
    gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    for n in eps:
        torch.testing.assert_close(eps[n], rho * grads[n] / gnorm, rtol=1e-4, atol=1e-7)


def test_vaccine_perturbed_loss_rises_by_rho_times_gradient_norm(tok):
    """First order: L(h + ε) - L(h) = ρ‖g‖ + O(ρ²), so the perturbation is applied in the ascent direction."""
    model = small_model(tok)
    batch = batch_of(tok, SAFE[:4])
    rho = 1e-3
    loss_fn = VaccineLoss(rho)
    grads = loss_fn.gradients(model, batch)
    gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    with torch.no_grad():
        plain = float(response_loss(model, batch))
    perturbed = float(loss_fn(model, batch).detach())
    assert (perturbed - plain) / (rho * gnorm) == pytest.approx(1.0, rel=0.05)


def test_vaccine_trains_with_lora(tok):
    _, res = train_vaccine(
        small_model(tok), tok, SAFE, tiny_cfg(mode="lora", lora_r=4, lora_alpha=8), rho=0.1
    )
    assert res.steps == 3 and all(math.isfinite(x) for x in res.losses)


# --------------------------------------------------------------------------- RepNoise


def mmd_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    z = np.concatenate([x, y])
    m = len(z)
    d2 = np.array([[float(((z[i] - z[j]) ** 2).sum()) for j in range(m)] for i in range(m)])
    b = d2.sum() / (m * m - m) / 4.0  # kernel_mul**(kernel_num // 2) = 2**2
    k = sum(np.exp(-d2 / (b * 2**i)) for i in range(5))
    n = len(x)
    return float((k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]).mean())


def test_mmd_matches_hand_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 6)), rng.normal(loc=0.7, size=(4, 6))
    got = float(mmd_rbf(torch.tensor(x), torch.tensor(y)))
    assert got == pytest.approx(mmd_by_hand(x, y), rel=1e-10)
    assert float(mmd_rbf(torch.tensor(x), torch.tensor(x))) == pytest.approx(0.0, abs=1e-12)
    assert got > 0


def test_repnoise_terms_use_the_harmful_answer_tokens(tok):
    model = small_model(tok)
    harmful, harmless = batch_of(tok, HARM[:3]), batch_of(tok, SAFE[:3])
    t = repnoise_terms(model, harmful, harmless, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(t["harmless"]) == pytest.approx(float(response_loss(model, harmless)), rel=1e-6)
        # the ascent term averages final logits and the logit lens of every hidden state (1 + 3 terms here)
        out = model(**{k: harmful[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        head, norm = model.get_output_embeddings(), model.model.norm
        terms = [out.logits] + [head(norm(h)) for h in out.hidden_states]
        ce = [float(masked_ce(lg, harmful["labels"])) for lg in terms]
        assert ce[0] == pytest.approx(float(response_loss(model, harmful)), rel=1e-6)
    assert float(t["harmful"]) == pytest.approx(sum(ce) / len(ce), rel=1e-5)
    assert float(t["noise"]) > 0


def test_repnoise_training_raises_harmful_loss(tok):
    model = small_model(tok)
    hb = batch_of(tok, HARM)
    with torch.no_grad():
        before = float(response_loss(model, hb))
    model, _ = train_repnoise(model, tok, SAFE, tiny_cfg(lr=3e-3, epochs=4), harmful=HARM, alpha=1.0)
    with torch.no_grad():
        after = float(response_loss(model, hb))
    assert after > before


# --------------------------------------------------------------------------- Booster


def test_booster_gradient_is_align_plus_lambda_harmful_difference(tok):
    model = small_model(tok)
    align, harm = batch_of(tok, SAFE[:4]), batch_of(tok, HARM[:4])
    lam, alpha = 5.0, 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = BoosterLoss(iter([harm]), lam, alpha)
    model.zero_grad()
    loss = loss_fn(model, align)
    loss.backward()
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # weights restored exactly after the virtual step
        assert torch.equal(p.detach(), before[n])

    # independent: three separate models
    def grads_of(m, batch):
        m.zero_grad()
        value = response_loss(m, batch)
        value.backward()
        return float(value), {n: p.grad.detach().clone() for n, p in m.named_parameters()}

    h_w, g_h = grads_of(copy.deepcopy(model), harm)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_h.values()))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p -= alpha * g_h[n] / (norm + 1e-7)
    h_w2, g_h2 = grads_of(moved, harm)
    l_w, g_l = grads_of(copy.deepcopy(model), align)
    assert float(loss) == pytest.approx(l_w + lam * (h_w - h_w2), rel=1e-5)
    assert h_w2 < h_w  # the virtual step is a descent step on the harmful loss
    for n in got:
        torch.testing.assert_close(got[n], g_l[n] + lam * (g_h[n] - g_h2[n]), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- Lisa


def test_lisa_states_and_proximal_term(tok):
    model = add_lora(small_model(tok), tiny_cfg(mode="lora", lora_r=4, lora_alpha=8))
    guide = BatchStream(tok, SAFE, 4, 48, seed=0)
    user = batch_of(tok, HARM[:4])
    total, rho = 20, 0.5
    loss_fn = LisaLoss(guide, total, rho=rho, alignment_steps=2, finetune_steps=3, warmup_fraction=0.25)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # the test's own bookkeeping: weights after every step
    after = [{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}]
    expected_states = (["alignment"] * 2 + ["finetune"] * 3) * 4
    anchors = {"alignment": after[0], "finetune": after[0]}
    for step in range(total):
        state = expected_states[step]
        if step > 0 and expected_states[step - 1] != state:
            anchors[expected_states[step - 1]] = after[-1]  # snapshot of the state being left
        other = anchors["finetune" if state == "alignment" else "alignment"]
        w = dict(model.named_parameters())
        want = 0.5 * rho * sum(float(((w[n].detach() - other[n]) ** 2).sum()) for n in names)
        loss = loss_fn(model, user)
        got_step, got_state, got_prox = loss_fn.history[-1]
        assert (got_step, got_state) == (step, state)
        if step > 0.25 * total:
            assert got_prox == pytest.approx(want, rel=1e-5, abs=1e-12)
        else:
            assert got_prox == 0.0
        opt.zero_grad()
        loss.backward()
        opt.step()
        after.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert any(p > 0 for _, _, p in loss_fn.history)


def test_lisa_training_runs(tok):
    _, res = train_lisa(
        small_model(tok), tok, HARM, tiny_cfg(epochs=3), guide=SAFE, alignment_steps=2, finetune_steps=3
    )
    assert res.steps == 9 and all(math.isfinite(x) for x in res.losses)


# --------------------------------------------------------------------------- LDIFS


def test_ldifs_distance_against_a_known_weight_change(tok):
    """Change only the last layer's down_proj by D: the only feature change is that MLP's output, by x Dᵀ with
    x the down_proj input (captured here with a pre-hook, independently of the code under test)."""
    model = small_model(tok)
    batch = batch_of(tok, SAFE[:3] + HARM[:1])
    loss_fn = LDIFSLoss(rho=1e-2)
    loss_fn(model, batch)  # first call freezes a copy
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in loss_fn.last.values())
    down = model.model.layers[-1].mlp.down_proj
    d = torch.randn(down.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05
    with torch.no_grad():
        down.weight += d
    seen = {}
    h = down.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    loss = loss_fn(model, batch)
    h.remove()
    mask = batch["attention_mask"].unsqueeze(-1).double()
    want = float(((seen["x"].double() @ d.double().T) * mask).pow(2).sum())
    layers = list(loss_fn.last)
    assert loss_fn.last[layers[0]] == pytest.approx(0.0, abs=1e-10)
    assert loss_fn.last[layers[-1]] == pytest.approx(want, rel=1e-4)
    with torch.no_grad():
        task = float(response_loss(model, batch))
    assert float(loss) == pytest.approx(task + 0.5 * 1e-2 * want, rel=1e-5)
    # the official < 0.1 gate drops exactly this (large) term; as published it is kept
    gated = LDIFSLoss(rho=1e-2, gate=1e-12)
    gated.frozen = loss_fn.frozen
    assert float(gated(model, batch)) == pytest.approx(task, rel=1e-6)


def test_ldifs_with_lora_uses_the_disabled_adapter(tok):
    model, _ = train_ldifs(
        small_model(tok), tok, HARM, tiny_cfg(mode="lora", lora_r=4, lora_alpha=8, lr=1e-2, epochs=2), rho=1.0
    )
    batch = batch_of(tok, SAFE[:2])
    loss_fn = LDIFSLoss(rho=1.0)
    loss_fn(model, batch)
    assert loss_fn.frozen is None  # no copy: the frozen features come from the adapter-disabled model
    assert sum(loss_fn.last.values()) > 0  # the trained adapter moved the features


# --------------------------------------------------------------------------- SafeLoRA


def test_projections_paper_formula_and_orthogonal_idempotent():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 3, generator=g) @ torch.randn(3, 5, generator=g)  # rank 3
    c = projection_matrix(v, "paper")
    torch.testing.assert_close(c, (v.double() @ v.double().T) / torch.linalg.norm(v.double()))
    assert not torch.allclose(c @ c, c)  # the published matrix is not idempotent (see the module docstring)
    p = projection_matrix(v, "orthogonal")
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p @ v.double(), v.double())  # identity on the span of V
    assert torch.linalg.matrix_rank(p) == 3


def _lora_model_with_known_updates(tok):
    """A LoRA model on q_proj/v_proj of layer 0/1 whose aligned-minus-unaligned weights span a known
    2-D column space U; layer 0's B lies inside span(U), every other B is orthogonal to it."""
    base = small_model(tok)
    model = add_lora(
        copy.deepcopy(base), tiny_cfg(mode="lora", lora_r=2, lora_alpha=2, lora_targets=("q_proj",))
    )
    g = torch.Generator().manual_seed(1)
    hidden = 32
    q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
    u, w = q[:, :2], q[:, 2:4]
    unaligned = {k: v.clone() for k, v in base.state_dict().items()}
    for i in range(2):
        key = f"model.layers.{i}.self_attn.q_proj.weight"
        unaligned[key] = (
            unaligned[key] - (u @ torch.randn(2, hidden, generator=g, dtype=torch.float64)).float()
        )
    layers = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.lora_A["default"].weight.copy_(torch.randn(2, hidden, generator=g))
            basis = u if i == 0 else w
            layer.lora_B["default"].weight.copy_(
                (basis @ torch.randn(2, 2, generator=g, dtype=torch.float64)).float()
            )
    return model, base, unaligned, layers


def test_safelora_fires_only_below_threshold_and_is_idempotent(tok):
    model, aligned, unaligned, layers = _lora_model_with_known_updates(tok)
    b_before = [layer.lora_B["default"].weight.detach().clone() for layer in layers]
    rep = safelora(model, aligned, unaligned, threshold=0.5, projection="orthogonal")
    names = sorted(rep.cosines)
    assert rep.cosines[names[0]] == pytest.approx(1.0, abs=1e-6)  # inside the subspace: cos 1, untouched
    assert rep.cosines[names[1]] == pytest.approx(0.0, abs=1e-6)  # orthogonal: cos 0, projected
    assert rep.projected == [names[1]]
    assert torch.equal(layers[0].lora_B["default"].weight, b_before[0])
    assert float(layers[1].lora_B["default"].weight.abs().max()) < 1e-5  # projected onto span(U): zero
    # idempotent: a second application changes nothing
    after = [layer.lora_B["default"].weight.detach().clone() for layer in layers]
    safelora(model, aligned, unaligned, threshold=0.5, projection="orthogonal")
    for layer, a in zip(layers, after, strict=True):
        torch.testing.assert_close(layer.lora_B["default"].weight, a, rtol=0, atol=1e-6)
    # a threshold below every cosine projects nothing
    model2, aligned2, unaligned2, _ = _lora_model_with_known_updates(tok)
    rep2 = safelora(model2, aligned2, unaligned2, threshold=-0.5, projection="orthogonal")
    assert rep2.projected == []


def test_safelora_paper_projection_on_full_finetuning(tok):
    aligned = small_model(tok, 0)
    unaligned = small_model(tok, 1)
    ft = copy.deepcopy(aligned)
    with torch.no_grad():
        ft.model.layers[0].mlp.up_proj.weight += 0.01
    rep = safelora(ft, aligned, unaligned, threshold=1.0, targets=["up_proj"])  # threshold 1: every layer
    assert set(rep.projected) == {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"}
    key = "model.layers.0.mlp.up_proj.weight"
    v = aligned.state_dict()[key].double() - unaligned.state_dict()[key].double()
    c = v @ v.T / torch.linalg.norm(v)
    want = aligned.state_dict()[key].double() + c @ torch.full_like(v, 0.01)
    torch.testing.assert_close(ft.state_dict()[key].double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError):
        safelora(ft, aligned, unaligned, select="bogus")


# --------------------------------------------------------------------------- RESTA


def test_dare_keeps_the_expected_delta():
    delta = torch.linspace(-1, 1, 50, dtype=torch.float64).reshape(5, 10)
    p = 0.3
    out = dare(delta, p, torch.Generator().manual_seed(0))
    kept = out != 0
    torch.testing.assert_close(out[kept], delta[kept] / (1 - p))
    draws = 4000
    gen = torch.Generator().manual_seed(1)
    mean = sum(dare(delta, p, gen) for _ in range(draws)) / draws
    # each entry's mean has standard deviation |δ| sqrt(p/(1-p)) / sqrt(draws); allow 5 of them
    tol = 5 * delta.abs() * math.sqrt(p / (1 - p)) / math.sqrt(draws) + 1e-12
    assert bool(((mean - delta).abs() <= tol).all())
    with pytest.raises(UserError):
        dare(delta, 1.0)


def test_resta_adds_the_safety_vector(tok):
    aligned, unaligned = small_model(tok, 0), small_model(tok, 1)
    ft = copy.deepcopy(aligned)
    with torch.no_grad():
        for p in ft.parameters():
            p += 0.01
    wa, wu, wf = aligned.state_dict(), unaligned.state_dict(), copy.deepcopy(ft.state_dict())
    out, rep = resta(ft, aligned, unaligned, scale=0.5, drop_rate=0.0)
    for name, value in out.state_dict().items():
        want = wf[name].double() + 0.5 * (wa[name].double() - wu[name].double())
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-6)
    assert rep.dropped == 0


def test_resta_merges_a_lora_adapter_and_applies_dare(tok):
    aligned, unaligned = small_model(tok, 0), small_model(tok, 1)
    model = add_lora(copy.deepcopy(aligned), tiny_cfg(mode="lora", lora_r=2, lora_alpha=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    out, rep = resta(model, aligned, unaligned, scale=0.0, drop_rate=0.5, seed=0)
    assert not hasattr(out, "peft_config")
    key = "model.layers.0.self_attn.q_proj.weight"
    delta = out.state_dict()[key].double() - aligned.state_dict()[key].double()
    assert 0.3 < float((delta == 0).double().mean()) < 0.7 and rep.dropped > 0
