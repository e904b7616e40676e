"""Shared by the benchmarks that train pocketgpt in their own process: the packaged config
composed as ``pocketgpt-train`` composes it, and one job run with its MLflow store, checkpoints
and printed log in a fresh temporary folder."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from pocketgpt.config import register_configs
from pocketgpt.train import TrainOutcome, build, run

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache/pocketgpt"  # the benchmarks' shared tokenizer and token cache


def compose_train(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` from the installed package, with ``overrides``."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("pocketgpt.conf", version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


@dataclass
class Trained:
    cfg: DictConfig  # as composed
    outcome: TrainOutcome
    uri: str  # the job's MLflow store
    log: list[str]  # what the job printed (stdout and stderr)

    @property
    def chose(self) -> str:
        """The trainer's ``trainer: ...`` line: device, precision, compile, threads, ..."""
        return next((ln for ln in self.log if ln.startswith("trainer:")), "")


def train_in_temp(prefix: str, overrides: list[str]) -> Trained:
    """Train one job as ``python -m pocketgpt.train`` would (MLflow to a SQLite store,
    checkpoints), everything in a new temporary folder; ``overrides`` come last and win."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    (tmp / "mlruns").mkdir()
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    cfg = compose_train(
        [
            f"tracking.uri={uri}",
            f"trainer.checkpoint_dir={tmp / 'checkpoints'}",
            f"cache_dir={CACHE}",
            *overrides,
        ]
    )
    log = tmp / "train.log"
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        outcome = run(build(cfg))
    return Trained(cfg, outcome, uri, log.read_text().splitlines())
