"""Client losses against hand calculations and the official formula."""

from __future__ import annotations

import math

import pytest
import torch

from robustlab.errors import UserError
from robustlab.fedld.losses import (
    fedprox_term,
    margin_control_loss,
    moon_contrastive_loss,
    scaffold_correction_term,
)

torch.set_num_threads(1)


def test_margin_control_by_hand_uniform_and_one_hot():
    # uniform logits over C=4 classes, batch 2: CE = log 4, ‖P‖_F² = 2·4·(1/16) = 1/2
    logits = torch.zeros(2, 4)
    y = torch.tensor([0, 3])
    loss = margin_control_loss(logits, y, lam=0.1)
    assert loss.item() == pytest.approx(math.log(4) + 0.1 * math.log(1.5), rel=1e-6)
    # per-sample: mean_b log(1 + 1/4)
    loss_ps = margin_control_loss(logits, y, lam=0.1, per_sample=True)
    assert loss_ps.item() == pytest.approx(math.log(4) + 0.1 * math.log(1.25), rel=1e-6)
    # near one-hot predictions: ‖P‖_F² -> B
    big = torch.tensor([[50.0, 0, 0], [0, 50.0, 0], [0, 0, 50.0]])
    y = torch.tensor([0, 1, 2])
    assert margin_control_loss(big, y, lam=1.0).item() == pytest.approx(math.log(1 + 3), abs=1e-6)


def test_margin_control_matches_official_formula_on_random_batch():
    torch.manual_seed(0)
    logits = torch.randn(50, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (50,))
    # official MarginalLogLoss: CE + λ·log(1 + torch.norm(softmax)²)
    p = torch.softmax(logits, dim=1)
    expected = torch.nn.CrossEntropyLoss()(logits, y) + 0.03 * torch.log(1 + torch.norm(p, p=2) ** 2)
    assert margin_control_loss(logits, y, lam=0.03).item() == pytest.approx(expected.item(), rel=1e-12)
    # by hand from probabilities
    ce = -sum(math.log(p[b, y[b]].item()) for b in range(50)) / 50
    reg = math.log(1 + sum(p[b, c].item() ** 2 for b in range(50) for c in range(5)))
    assert margin_control_loss(logits, y, lam=0.03).item() == pytest.approx(ce + 0.03 * reg, rel=1e-10)


def test_margin_control_gradient_penalises_confidence():
    """d/dlogits of the regulariser alone pushes towards uniform: the top logit's gradient is positive."""
    logits = torch.tensor([[3.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    reg = margin_control_loss(logits, y, lam=1.0) - torch.nn.functional.cross_entropy(logits, y)
    reg.backward()
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1] < 0


def test_margin_control_rejects_bad_shape():
    with pytest.raises(UserError):
        margin_control_loss(torch.zeros(4), torch.zeros(4, dtype=torch.long))


def test_fedprox_term_by_hand_and_gradient():
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    g = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    term = fedprox_term(w, g, mu=0.1)
    assert term.item() == pytest.approx(0.05 * (1 + 4 + 4))
    term.backward()
    # gradient μ(w - w_g)
    assert torch.allclose(w[0].grad, torch.tensor([0.1, 0.2]))
    assert torch.allclose(w[1].grad, torch.tensor([[0.2]]))
    assert fedprox_term(w, [p.detach() for p in w], mu=1.0).item() == 0.0
    with pytest.raises(UserError):
        fedprox_term(w, g[:1], mu=0.1)


def test_moon_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_glob = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos = 1, 1/sqrt(2)
    z_prev = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # cos = 0, -1
    tau = 0.5
    expected = []
    for pos, neg in [(1.0, 0.0), (1 / math.sqrt(2), -1.0)]:
        expected.append(-math.log(math.exp(pos / tau) / (math.exp(pos / tau) + math.exp(neg / tau))))
    loss = moon_contrastive_loss(z, z_glob, z_prev, tau=tau)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # two previous models: both enter the denominator
    loss2 = moon_contrastive_loss(z[:1], z_glob[:1], [z_prev[:1], z_prev[:1]], tau=tau)
    assert loss2.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-6)
    with pytest.raises(UserError):
        moon_contrastive_loss(z, z_glob, z_prev, tau=0)


def test_scaffold_correction_gradient_is_c_minus_ci():
    w = [torch.tensor([1.0, -1.0], requires_grad=True)]
    c = [torch.tensor([0.5, 0.25])]
    ci = [torch.tensor([0.25, 1.0])]
    scaffold_correction_term(w, c, ci).backward()
    assert torch.allclose(w[0].grad, torch.tensor([0.25, -0.75]))
