"""Shared fixtures and helpers: real Hydra composition of the packaged configs with small
overrides, tiny settings, and subprocess runs of the real commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from pocketgpt.config import register_configs

ROOT = Path(__file__).resolve().parents[1]

# A model and budget small enough for a few seconds of CPU per run.
TINY = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.num_layers=2",
    "model.max_len=32",
    "data.block_size=32",
    "tokenizer.vocab_size=300",
    "trainer.batch_size=4",
    "trainer.max_steps=6",
    "trainer.eval_interval=3",
    "trainer.eval_max_batches=2",
    "trainer.log_interval=2",
    "trainer.sample_tokens=5",
    "trainer.progress=false",
    "optim.warmup_steps=2",
]


def compose(name: str = "train", *overrides: str):
    """The real composed DictConfig of ``name`` (as ``pocketgpt-train`` composes it)."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("pocketgpt.conf", version_base="1.3"):
            return hydra_compose(config_name=name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides, name="train") -> compose(name, *overrides)."""

    def _compose(*overrides: str, name: str = "train"):
        return compose(name, *overrides)

    return _compose


def sweep_overrides(**changes: str) -> list[str]:
    """TINY, made cheaper for subprocess jobs: 2 steps, bigger batches (fewer test batches)."""
    base = dict(o.split("=", 1) for o in TINY)
    base.update(
        {
            "trainer.batch_size": "32",
            "trainer.max_steps": "2",
            "trainer.eval_interval": "2",
            "trainer.log_interval": "1",
            "trainer.threads": "1",
            "tracking.log_model": "false",
            "tracking.experiment_name": "sweeps",
        }
    )
    base.update(changes)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One tokenizer/corpus cache for every subprocess test in the session."""
    path = tmp_path_factory.getbasetemp() / "pocketgpt-shared-cache"
    path.mkdir(exist_ok=True)
    return path


def run_multirun(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """``pocketgpt-train -m ARGS`` in a fresh process, with the default store under ``cwd``."""
    env = {**os.environ, "POCKETGPT_CACHE_DIR": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "pocketgpt.train", "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def small_text_files(tmp_path):
    """Three small UTF-8 text splits cut from the embedded corpus."""
    import gzip

    from pocketgpt.data import embedded_corpus_dir

    with gzip.open(embedded_corpus_dir() / "train.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    paths = {}
    for name, (a, b) in {"train": (0, 300), "validation": (300, 400), "test": (400, 500)}.items():
        p = tmp_path / f"{name}.txt"
        p.write_text("".join(lines[a:b]), encoding="utf-8")
        paths[name] = p
    return paths


@pytest.fixture(autouse=True, scope="session")
def _quiet_mlflow():
    """As the commands do (pocketgpt.cli.quiet_mlflow): no progress bar per artifact file."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield
    mp.undo()
