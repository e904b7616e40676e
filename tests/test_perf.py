"""The performance work keeps the math: precision=auto, the trainer's timings and its log line,
and the benchmarks' BENCHMARKS.md helper (the fused head + cross-entropy: test_fused_loss.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pocketgpt.config import TrainerConfig, validate
from pocketgpt.errors import ConfigError
from pocketgpt.runtime import (
    Runtime,
    autocast_context,
    resolve_device,
    resolve_precision,
    should_compile,
)
from pocketgpt.train import train

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_precision_auto():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert isinstance(autocast_context(cpu, "auto"), type(autocast_context(cpu, "fp32")))


@pytest.mark.parametrize("bf16_ok,expected", [(True, "bf16"), (False, "fp16")])
def test_cuda_choices_without_a_gpu(monkeypatch, bf16_ok, expected):
    """What auto picks on a CUDA machine, checked here with CUDA's answers simulated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    cuda = torch.device("cuda")
    assert resolve_device("auto") == cuda and resolve_device("cuda") == cuda
    assert resolve_precision("auto", cuda) == expected
    assert resolve_precision("fp32", cuda) == "fp32"
    assert should_compile("auto", cuda) and not should_compile("false", cuda)
    assert should_compile("true", torch.device("cpu")) and not should_compile(
        "auto", torch.device("cpu")
    )
    runtime = Runtime.from_config(TrainerConfig(device="cuda"))
    assert (runtime.precision, runtime.compiled, runtime.fused_head) == (expected, True, False)
    assert runtime.allocator == "default"  # the glibc tuning is for CPU training only
    line = runtime.describe("AdamW fused")
    assert f"precision {expected} (auto on cuda), compile on (auto on cuda)" in line


def test_a_missing_device_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.device=cuda but no cuda device is available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device='tpu' is not a torch device"):
        resolve_device("tpu", "device")


def test_precision_config_choices(compose_cfg):
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose_cfg())
    assert cfg.trainer.precision == "auto"
    validate(cfg)
    validate(OmegaConf.to_object(compose_cfg("trainer.precision=fp32")))
    # An Enum field: Hydra refuses an unknown precision when composing, naming the choices.
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("trainer.precision=fp8")
    assert "expected one of [auto, fp32, bf16, fp16]" in str(info.value.__cause__)


@pytest.mark.slow  # trains
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
