"""The fused, chunked head + cross-entropy (pocketgpt.fused_loss) keeps the math: its loss and
gradients equal F.cross_entropy's, and ``lm_loss`` equals the model's own forward loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocketgpt import fused_loss
from pocketgpt.config import ModelConfig
from pocketgpt.fused_loss import linear_cross_entropy, lm_loss
from pocketgpt.model import GPTMini

CFG = ModelConfig(vocab_size=300, d_model=32, n_heads=4, d_ff=64, num_layers=2, max_len=16)


def _reference(h, w, t):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), t)
    loss.backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("n,v,c", [(2048, 8192, 128), (300, 1000, 32), (37, 50, 16), (1, 7, 4)])
def test_linear_cross_entropy_matches_f_cross_entropy(n, v, c):
    torch.manual_seed(n)
    h = torch.randn(n, c, requires_grad=True)
    w = (0.5 * torch.randn(v, c)).requires_grad_()
    t = torch.randint(0, v, (n,))
    loss, logits = linear_cross_entropy(h, w, t)
    loss.backward()
    ref_loss, ref_gh, ref_gw = _reference(h, w, t)
    assert torch.equal(logits, h.detach() @ w.detach().t())
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-6)
    assert torch.allclose(h.grad, ref_gh, rtol=1e-5, atol=1e-6)
    assert torch.allclose(w.grad, ref_gw, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_gradient_through_logits_and_retained_graph():
    torch.manual_seed(0)
    h = torch.randn(70, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    t = torch.randint(0, 30, (70,))
    loss, logits = linear_cross_entropy(h, w, t)
    total = 2.0 * loss + (logits**2).mean()
    total.backward(retain_graph=True)
    total.backward()  # a second pass over the retained graph doubles the gradients exactly
    gh, gw = h.grad.clone(), w.grad.clone()

    h2 = h.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    logits2 = h2 @ w2.t()
    (2.0 * F.cross_entropy(logits2, t) + (logits2**2).mean()).backward()
    assert torch.allclose(gh, 2 * h2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gw, 2 * w2.grad, rtol=1e-5, atol=1e-6)


def _twins(seed: int) -> tuple[GPTMini, GPTMini]:
    torch.manual_seed(seed)
    a = GPTMini(CFG)
    b = GPTMini(CFG)
    b.load_state_dict(a.state_dict())
    return a, b


def test_model_loss_and_grads_match_the_plain_path(monkeypatch):
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 300, (3, 16)), torch.randint(0, 300, (3, 16))
    fused, plain = _twins(1)
    calls = []
    real_linear_ce = fused_loss.linear_cross_entropy
    monkeypatch.setattr(
        fused_loss,
        "linear_cross_entropy",
        lambda *a, **k: calls.append(1) or real_linear_ce(*a, **k),
    )
    loss_f = lm_loss(fused, idx, targets)
    loss_f.backward()
    assert calls  # the fused path ran
    monkeypatch.setattr(fused_loss, "fused_ok", lambda h, t: False)
    loss_p = lm_loss(plain, idx, targets)
    loss_p.backward()
    assert len(calls) == 1  # and then the plain one
    assert loss_f.item() == pytest.approx(loss_p.item(), rel=1e-6)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name


def test_lm_loss_equals_forward_loss_and_grads():
    a, b = _twins(2)
    idx, targets = torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16))
    loss_a = lm_loss(a, idx, targets)
    loss_a.backward()
    _, loss_b = b(idx, targets)
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert lm_loss(a, idx, targets).item() == pytest.approx(loss_b.item(), rel=1e-6)


def test_ignored_targets_take_the_plain_path():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32, num_layers=1, max_len=8)
    model = GPTMini(cfg)
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.clone()
    targets[0, :3] = -100
    assert not fused_loss.fused_ok(model.hidden_states(idx), targets)
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.view(-1, 50), targets.view(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert lm_loss(model, idx, targets).item() == pytest.approx(expected.item(), rel=1e-6)
