"""The performance work keeps the math: the fused head + cross-entropy, precision=auto, the
trainer's timings and its log line, and the benchmarks' BENCHMARKS.md helper."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from pocketgpt import model as model_mod
from pocketgpt.config import ConfigError, validate
from pocketgpt.model import GPTConfig, GPTMini, linear_cross_entropy
from pocketgpt.train import train
from pocketgpt.trainer import autocast_context, resolve_precision

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


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


def test_model_loss_and_grads_match_the_plain_path(monkeypatch):
    cfg = GPTConfig(vocab_size=300, d_model=32, n_heads=4, d_ff=64, num_layers=2, max_len=16)
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 300, (3, 16)), torch.randint(0, 300, (3, 16))
    torch.manual_seed(1)
    fused = GPTMini(cfg)
    plain = GPTMini(cfg)
    plain.load_state_dict(fused.state_dict())
    logits_f, loss_f = fused(idx, targets)
    loss_f.backward()
    monkeypatch.setattr(model_mod, "_fused_head_ok", lambda x, t: False)
    logits_p, loss_p = plain(idx, targets)
    loss_p.backward()
    assert torch.equal(logits_f, logits_p)
    assert loss_f.item() == pytest.approx(loss_p.item(), rel=1e-6)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name


def test_loss_method_equals_forward_loss_and_grads():
    cfg = GPTConfig(vocab_size=300, d_model=32, n_heads=4, d_ff=64, num_layers=2, max_len=16)
    torch.manual_seed(2)
    a = GPTMini(cfg)
    b = GPTMini(cfg)
    b.load_state_dict(a.state_dict())
    idx, targets = torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16))
    loss_a = a.loss(idx, targets)
    loss_a.backward()
    _, loss_b = b(idx, targets)
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert a.loss(idx, targets).item() == pytest.approx(loss_b.item(), rel=1e-6)


def test_ignored_targets_take_the_plain_path():
    cfg = GPTConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32, num_layers=1, max_len=8)
    model = GPTMini(cfg)
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.clone()
    targets[0, :3] = -100
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.view(-1, 50), targets.view(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_precision_auto():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert isinstance(autocast_context(cpu, "auto"), type(autocast_context(cpu, "fp32")))


def test_precision_config_choices(compose_cfg):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose_cfg())
    assert cfg.trainer.precision == "auto"
    validate(cfg)
    validate(OmegaConf.to_object(compose_cfg("trainer.precision=fp32")))
    with pytest.raises(ConfigError, match="auto, fp32, bf16, fp16"):
        validate(OmegaConf.to_object(compose_cfg("trainer.precision=fp8")))


def test_trainer_logs_its_choices_and_timings(compose_cfg, tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    cfg = compose_cfg(
        *TINY,
        f"tracking.uri={store}",
        f"cache_dir={tmp_path / 'cache'}",
        "tracking.log_model=false",
    )
    train(cfg)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("trainer:"))
    assert "device cpu" in line and "precision fp32 (auto on cpu)" in line
    assert "compile off (auto on cpu)" in line and "threads" in line
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("pocketgpt").experiment_id])
    m = run.data.metrics
    parts = ["data", "compute", "tracking", "progress", "eval", "checkpoint"]
    assert all(m[f"time_{k}"] >= 0 for k in parts)
    assert m["time_compute"] > 0 and m["time_eval"] > 0
    assert sum(m[f"time_{k}"] for k in parts) <= m["time_total"] + 1e-6


def test_report_sections_and_summary(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    doc = (
        "# Benchmarks\n\n## Summary\n\n| q | script | result | target | met |\n|---|---|---|---|---|\n"
        "| (a) | x.py | old | >= 1 | no |\n\n## (a) Training\n\nintro\n\n## (b) Tokenizer\n\nb\n"
    )
    path = tmp_path / "B.md"
    path.write_text(doc)
    _report.append_section("(a) Training", "### run 1\n\nrow", path)
    _report.append_section("(a) Training", "### run 2", path)
    _report.append_section("(c) New", "c body", path)
    _report.set_summary("(a)", "1.3x", "yes", path)
    text = path.read_text()
    a = text.index("## (a) Training")
    assert a < text.index("intro") < text.index("### run 1") < text.index("### run 2")
    assert text.index("### run 2") < text.index("## (b) Tokenizer") < text.index("## (c) New")
    assert text.rstrip().endswith("c body")
    assert "| (a) | x.py | 1.3x | >= 1 | yes |" in text
