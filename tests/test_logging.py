"""What a run shows and where: the bar or plain lines (pocketgpt.progress), the job's log file,
and the console of a sweep job."""

from __future__ import annotations

import io
import logging
import logging.config
import os
import subprocess
import sys
from importlib.resources import files

import pytest
from omegaconf import OmegaConf

from pocketgpt.config import ConfigError, Progress, TrainerConfig
from pocketgpt.progress import (
    JobSlot,
    TrainingProgress,
    console_handlers,
    use_job_console,
    wants_bar,
)
from pocketgpt.tracking.sweep import job_slot_of, parallel_jobs

from .conftest import TINY

METRICS = {"train_loss": 5.25, "lr": 1e-3, "tokens_per_sec": 1234.0, "grad_norm": 0.5}


class Stream(io.StringIO):
    """A stream that says whether it is a terminal."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def job_logging(tmp_path):
    """The root logger as Hydra's job logging leaves it (conf/hydra/job_logging/pocketgpt.yaml):
    a console (here a StringIO) and the job's log file."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    conf = OmegaConf.load(files("pocketgpt.conf") / "hydra" / "job_logging" / "pocketgpt.yaml")
    conf.handlers.file.filename = str(tmp_path / "train.log")
    logging.config.dictConfig(OmegaConf.to_container(conf))
    console = io.StringIO()
    (handler,) = console_handlers()
    handler.setStream(console)
    yield console, tmp_path / "train.log"
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = saved


def _report(progress: TrainingProgress) -> None:
    with progress:
        progress.advance()
        progress.step(2, 4, METRICS)
        progress.line("step 2: val loss 5.1000")
        progress.line("step 3: non-finite loss, step skipped", logging.WARNING)


def test_progress_setting_and_terminal_choose_the_bar():
    assert wants_bar(Progress.auto, Stream(tty=True))
    assert not wants_bar(Progress.auto, Stream(tty=False))
    assert wants_bar(Progress.true, Stream(tty=False))
    assert not wants_bar(Progress.false, Stream(tty=True))
    # Hydra hands `trainer.progress=false` over as the string 'False', as for trainer.compile.
    assert TrainerConfig(progress="False").progress is Progress.false
    assert TrainerConfig().progress is Progress.auto
    with pytest.raises(ConfigError, match="trainer.progress='sometimes' is not one of auto"):
        TrainerConfig(progress="sometimes")


def test_without_a_terminal_every_line_is_a_plain_log_line(job_logging):
    console, log_file = job_logging
    stderr = Stream(tty=False)
    progress = TrainingProgress(4, 0, Progress.auto, stream=stderr)
    assert progress.bar is None
    _report(progress)
    assert stderr.getvalue() == ""  # no bar, so no carriage returns
    shown = console.getvalue()
    assert "\r" not in shown
    assert shown.splitlines() == [
        "step 2/4: train loss 5.2500, lr 1.00e-03, 1234 tokens/s, grad norm 0.500",
        "step 2: val loss 5.1000",
        "warning: step 3: non-finite loss, step skipped",
    ]
    logged = log_file.read_text()
    assert "[pocketgpt.trainer][INFO] - step 2/4: train loss 5.2500" in logged
    assert "[pocketgpt.trainer][INFO] - step 2: val loss 5.1000" in logged


def test_under_a_bar_lines_go_above_it_and_step_lines_to_the_log_only(job_logging):
    console, log_file = job_logging
    stderr = Stream(tty=True)
    progress = TrainingProgress(4, 0, Progress.auto, stream=stderr)
    assert progress.bar is not None
    root = logging.getLogger()
    before = root.handlers[:]
    _report(progress)
    assert root.handlers == before  # the console handler is back after fit
    # The bar holds the step's figures; the console shows each other line once.
    assert "loss=5.250" in stderr.getvalue() and "1/4" in stderr.getvalue()
    assert console.getvalue().splitlines() == [
        "step 2: val loss 5.1000",
        "warning: step 3: non-finite loss, step skipped",
    ]
    logged = log_file.read_text()
    assert logged.count("step 2/4: train loss") == 1 and logged.count("val loss 5.1000") == 1


def test_a_sweep_job_gets_its_own_bar_line_and_labelled_console_lines(job_logging):
    console, log_file = job_logging
    slot = JobSlot("#3", 1)
    use_job_console(slot)
    stderr = Stream(tty=True)
    progress = TrainingProgress(4, 0, Progress.auto, slot=slot, stream=stderr)
    assert progress.bar.pos == -1  # tqdm keeps a fixed position negated: its terminal line 1
    assert progress.bar.desc == "train #3"
    _report(progress)
    # Without a bar too: the job's console shows its evaluations, behind its number.
    _report(TrainingProgress(4, 0, Progress.false, slot=slot))
    lines = console.getvalue().splitlines()
    assert lines == 2 * [
        "#3 step 2: val loss 5.1000",
        "#3 warning: step 3: non-finite loss, step skipped",
    ]
    assert log_file.read_text().count("step 2/4: train loss 5.2500") == 2  # the file has them


def test_other_ranks_show_nothing(job_logging):
    console, log_file = job_logging
    stderr = Stream(tty=True)
    progress = TrainingProgress(4, 0, Progress.true, stream=stderr, shown=False)
    assert progress.bar is None
    _report(progress)
    assert stderr.getvalue() == console.getvalue() == log_file.read_text() == ""


def test_unconfigured_logging_prints_the_lines(monkeypatch, capsys):
    """The library from a script: nobody set up logging, so the lines go to stdout."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    _report(TrainingProgress(4, 0, Progress.false))
    out = capsys.readouterr().out
    assert "step 2: val loss 5.1000\n" in out and "step 2/4: train loss" in out
    assert not logging.getLogger("pocketgpt.trainer").handlers  # nothing left behind


@pytest.mark.parametrize(
    ("launcher", "num", "position"),
    [({"n_jobs": 2}, 3, 1), ({"n_jobs": 4}, 2, 2), ({}, 5, 0), ({"n_jobs": -1}, 0, 0)],
)
def test_a_sweep_jobs_bar_line_is_its_number_modulo_the_parallel_jobs(launcher, num, position):
    config = OmegaConf.create({"hydra": {"launcher": launcher, "job": {"num": num}}})
    assert job_slot_of(config) == JobSlot(f"#{num}", position)


def test_parallel_jobs_follows_joblibs_convention():
    def jobs(n):
        return parallel_jobs(OmegaConf.create({"hydra": {"launcher": {"n_jobs": n}}}))

    assert jobs(3) == 3 and jobs(-1) == os.cpu_count() and jobs(None) == 1


@pytest.mark.slow  # trains, in a subprocess
def test_the_job_log_holds_the_run_and_a_log_file_no_bar(tmp_path, shared_cache):
    """`pocketgpt-train > file 2>&1` (CI, nohup): plain lines, no carriage returns, and Hydra's
    train.log holds the step and evaluation lines."""
    out_dir = tmp_path / "out"
    stderr_file = tmp_path / "stderr.txt"
    env = {**os.environ, "POCKETGPT_CACHE_DIR": str(shared_cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    overrides = [o for o in TINY if not o.startswith("trainer.progress")]
    with stderr_file.open("w") as stderr:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pocketgpt.train",
                *overrides,
                "trainer.max_steps=4",
                "trainer.eval_interval=2",
                "trainer.threads=1",
                "tracking.log_model=false",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"hydra.run.dir={out_dir}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=600,
        )
    err = stderr_file.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "\r" not in err and "\r" not in proc.stdout
    assert "train:" not in err  # no bar at all
    job_log = (out_dir / "train.log").read_text()
    for line in ("step 2/4: train loss", "step 4/4: train loss", "step 0: val loss"):
        assert f"[pocketgpt.trainer][INFO] - {line}" in job_log, line
        assert proc.stdout.count(line) == 1, line  # on the console once, plain
    assert "[INFO]" not in proc.stdout  # the console's lines are the message alone
    # The job's own lines too: the whole run, from the banner to where its run is.
    for line in (
        "pocketgpt 0.1.0:",
        "trainer: device cpu",
        "final: val loss",
        "MLflow: experiment",
    ):
        assert line in job_log, line
        assert proc.stdout.count(line) == 1, line
