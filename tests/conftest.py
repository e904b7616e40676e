"""Shared fixtures: real Hydra composition of conf/train.yaml with small overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pocketgpt.config import register_configs
from pocketgpt.train import config_dir

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


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the real composed DictConfig (as `python -m pocketgpt.train`)."""
    register_configs()

    def _compose(*overrides: str, name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


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
