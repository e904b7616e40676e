"""Sweeps end to end: `python -m pocketgpt.train -m ...` in a subprocess, into a real SQLite store.

Each multirun is 2 to 4 tiny jobs of 2 steps; the tokenizer cache is shared by the session so the
tokenizer trains once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pocketgpt.config import ConfigError, TrackingConfig
from pocketgpt.errors import NonFiniteLossError
from pocketgpt.tracking.run import Tracker
from pocketgpt.tracking.store import RetryingClient
from pocketgpt.tracking.sweep import (
    PARENT_FILE,
    MlflowSweepCallback,
    SweepJobFailed,
    SweepParent,
    children,
    close_parent,
    error_message,
    read_parent,
    record_failed_job,
    sweep_keys,
    where_runs_go,
    write_parent,
)

from .conftest import run_multirun, sweep_overrides


def load_sweep(cwd: Path, experiment: str = "sweeps"):
    """(client, parent run, children sorted by job number) from the store under cwd/mlruns."""
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pocketgpt.role") == "sweep"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r is not parent]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["pocketgpt.role"] == "job"
    children.sort(key=lambda r: int(r.data.tags["hydra.job.num"]))
    return client, parent, children


@pytest.mark.slow
def test_multirun_nests_every_job_under_one_parent_run(tmp_path, shared_cache):
    proc = run_multirun(
        *sweep_overrides(),
        "optim.lr=1e-3,3e-3",
        "model.num_layers=1,2",
        cwd=tmp_path,
        cache=shared_cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parent, children = load_sweep(tmp_path)

    sweep_dir = Path(parent.data.tags["sweep.dir"])
    assert sweep_dir.is_dir() and sweep_dir.is_relative_to(tmp_path / "multirun")
    saved = json.loads((sweep_dir / PARENT_FILE).read_text())
    assert saved["run_id"] == parent.info.run_id
    assert "optim.lr=1e-3,3e-3 model.num_layers=1,2" in parent.data.tags["sweep.overrides"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.jobs"] == "4" and parent.data.tags["sweep.failed"] == "0"
    # The terminal says where the runs went and how to compare them.
    assert f"MLflow sweep: parent run {parent.info.run_id} " in proc.stdout
    assert "in experiment 'sweeps'" in proc.stdout
    compare = f"compare its jobs: pocketgpt-compare sweeps --sweep {parent.info.run_id[:8]}\n"
    assert compare in proc.stdout

    # The cartesian product, one job each; every child's params are its own overrides.
    assert [c.data.tags["hydra.job.num"] for c in children] == ["0", "1", "2", "3"]
    combos = {(c.data.params["optim.lr"], c.data.params["model.num_layers"]) for c in children}
    assert combos == {("0.001", "1"), ("0.001", "2"), ("0.003", "1"), ("0.003", "2")}
    for child in children:
        assert child.info.status == "FINISHED"
        lr, layers = child.data.params["optim.lr"], child.data.params["model.num_layers"]
        own = child.data.tags["hydra.overrides"].split()
        assert f"model.num_layers={layers}" in own
        assert f"optim.lr={lr}" in own
        # Named after its job number and the overrides the sweep varies.
        assert child.info.run_name.split() == [
            f"#{child.data.tags['hydra.job.num']}",
            f"model.num_layers={layers}",
            f"optim.lr={lr}",
        ]
        for key in ("train_loss", "val_loss", "val_bpb", "test_loss", "tokens_per_sec"):
            assert key in child.data.metrics, key
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [
            1,
            2,
        ]
    best = min(children, key=lambda c: c.data.metrics["best_val_loss"])
    assert parent.data.tags["sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.data.metrics["best_val_loss"])


@pytest.mark.slow
def test_failed_jobs_are_recorded_and_the_sweep_goes_on(tmp_path, shared_cache):
    # lr=1e30 fails inside the run (the loss becomes NaN at step 2); n_heads=3 fails validation
    # before any run starts. Only job 0 succeeds.
    proc = run_multirun(
        *sweep_overrides(),
        "optim.lr=1e-3,1e30",
        "model.n_heads=2,3",
        cwd=tmp_path,
        cache=shared_cache,
    )
    assert proc.returncode == 1  # Hydra reports the failure once every job has run
    assert "Error executing job" in proc.stderr
    assert "Traceback" not in proc.stderr  # one line per failed job; tracebacks in job logs
    client, parent, children = load_sweep(tmp_path)
    assert len(children) == 4
    by_job = {(c.data.params["optim.lr"], c.data.params["model.n_heads"]): c for c in children}
    ok = by_job["0.001", "2"]
    assert ok.info.status == "FINISHED" and "error" not in ok.data.tags
    assert [c.info.status for c in children].count("FAILED") == 3

    pre_run = by_job[
        "0.001", "3"
    ]  # a config error: a FAILED child of its own, with the job's params
    assert pre_run.data.tags["error"].startswith(
        "ConfigError: model.d_model=32 is not divisible by model.n_heads=3"
    )
    assert pre_run.data.params["model.n_heads"] == "3"
    assert "model.n_heads=3" in pre_run.data.tags["hydra.overrides"]

    in_run = by_job["1e+30", "2"]  # the run that train() started, now tagged with its error
    assert in_run.data.tags["error"].startswith("NonFiniteLossError: the training loss became")
    assert in_run.data.params["optim.lr"] == "1e+30"
    assert "train_loss" in in_run.data.metrics  # what was logged before the failure stays
    num = in_run.data.tags["hydra.job.num"]
    job_log = Path(parent.data.tags["sweep.dir"]) / num / "train.log"
    failures = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: sweep job #")]
    assert len(failures) == 3
    assert (
        f"error: sweep job #{num} failed: NonFiniteLossError: the training loss became nan "
        in proc.stderr
    )
    assert f"(traceback in {job_log})" in proc.stderr
    assert "Traceback (most recent call last)" in job_log.read_text()

    assert by_job["1e+30", "3"].data.tags["error"].startswith("ConfigError")
    assert parent.info.status == "FINISHED"  # one job succeeded
    assert parent.data.tags["sweep.failed"] == "3"
    assert parent.data.tags["sweep.best_run_id"] == ok.info.run_id


@pytest.mark.slow
def test_joblib_runs_parallel_jobs_into_one_sqlite_store(tmp_path, shared_cache):
    proc = run_multirun(
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *sweep_overrides(),
        "optim.lr=1e-3,2e-3,3e-3,4e-3",
        cwd=tmp_path,
        cache=shared_cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "database is locked" not in proc.stdout + proc.stderr
    # No terminal: no bars (no carriage returns); each job's evaluations behind its number.
    assert "\r" not in proc.stdout + proc.stderr
    for num in range(4):
        assert f"#{num} step 2: val loss" in proc.stdout
    assert "train loss" not in proc.stdout  # step lines only in each job's train.log
    client, parent, children = load_sweep(tmp_path)
    assert "JoblibLauncher" in parent.data.tags["sweep.launcher"]
    assert parent.info.status == "FINISHED"
    assert len(children) == 4
    assert sorted(c.data.params["optim.lr"] for c in children) == [
        "0.001",
        "0.002",
        "0.003",
        "0.004",
    ]
    # Nothing lost: every job has the same complete set of params and full metric histories.
    keys = set(children[0].data.params)
    assert len(keys) > 40
    for child in children:
        assert child.info.status == "FINISHED"
        assert set(child.data.params) == keys
        history = client.get_metric_history
        assert [m.step for m in history(child.info.run_id, "train_loss")] == [1, 2]
        assert [m.step for m in history(child.info.run_id, "val_loss")] == [0, 2]
        assert {"test_loss", "test_bpb", "best_val_loss"} <= set(child.data.metrics)
    # The jobs ran in the two loky workers, not in the launching process (which created the
    # parent). At this size a job's MLflow run lasts under a second, so whether two runs overlap
    # in time is luck; the store's side of concurrency is SQLite's busy wait plus
    # RetryingClient (test_retrying_client_rides_out_a_locked_database).
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout


@pytest.mark.slow
def test_optuna_trials_are_child_runs(tmp_path, shared_cache):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_multirun(
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.seed=1",
        *sweep_overrides(),
        "optim.lr=tag(log,interval(1e-4,1e-2))",
        "model.dropout=interval(0.0,0.3)",
        cwd=tmp_path,
        cache=shared_cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, parent, children = load_sweep(tmp_path)
    assert "OptunaSweeper" in parent.data.tags["sweep.sweeper"]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    lrs = [float(c.data.params["optim.lr"]) for c in children]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert all(c.info.run_name.startswith(f"#{i} ") for i, c in enumerate(children))
    results = (Path(parent.data.tags["sweep.dir"]) / "optimization_results.yaml").read_text()
    best = min(c.data.metrics["val_loss"] for c in children)
    assert f"best_value: {best}" in results


# --------------------------------------------------------------------------- units


def test_retrying_client_rides_out_a_locked_database():
    calls = []

    class Flaky:
        def log_batch(self, run_id):
            calls.append(run_id)
            if len(calls) < 3:
                raise RuntimeError("(sqlite3.OperationalError) database is locked")
            return "ok"

        def get_run(self, run_id):
            raise ValueError("no such run")

    client = RetryingClient(Flaky(), base_delay=0.001)
    assert client.log_batch("r") == "ok" and len(calls) == 3
    with pytest.raises(ValueError, match="no such run"):  # other errors are not retried
        client.get_run("r")


def test_sweep_keys_and_child_names():
    keys = sweep_keys(["optim.lr=1e-3,3e-3", "model.d_model=64", "+x=range(1,3)"], None)
    assert keys == ["optim.lr", "x"]
    keys = sweep_keys(["model.d_model=64"], {"optim.lr": "1e-3,3e-3"})
    assert keys == ["optim.lr"]
    parent = SweepParent("r", "1", "sqlite:///x", "/tmp/s", ["optim.lr"])
    assert parent.child_name(["model.d_model=64", "optim.lr=0.003"], 2) == "#2 optim.lr=0.003"


def test_error_message_is_one_line():
    message = error_message(ValueError("bad\n  value"))
    assert message == "ValueError: bad value"


def _failed_job_config(uri: str, num: int, override: str):
    """What Hydra hands a job's callbacks: the task config plus its hydra node."""
    return OmegaConf.create(
        {
            "tracking": {"uri": uri, "experiment_name": "units"},
            "model": {"n_heads": 3},
            "hydra": {"job": {"num": num}, "overrides": {"task": [override]}},
        }
    )


def test_parent_ends_failed_only_when_every_child_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def new_parent() -> SweepParent:
        tracker = Tracker(TrackingConfig(uri=uri, experiment_name="units"))
        run_id = tracker.start(run_name="sweep", tags={"pocketgpt.role": "sweep"})
        return SweepParent(run_id, tracker.experiment_id, uri, str(tmp_path), ["model.n_heads"])

    all_failed = new_parent()
    for num in (0, 1):
        cfg = _failed_job_config(uri, num, f"model.n_heads={3 + num}")
        record_failed_job(cfg, ConfigError(f"bad heads {num}"), all_failed)
    assert close_parent(all_failed) == "FAILED"
    assert close_parent(all_failed) is None  # closing twice (atexit after on_multirun_end): no-op

    client = MlflowClient(uri)
    kids = children(client, all_failed)
    assert [k.data.tags["error"] for k in kids] == [
        "ConfigError: bad heads 0",
        "ConfigError: bad heads 1",
    ]
    assert kids[1].info.run_name == "#1 model.n_heads=4"
    assert kids[1].data.params["model.n_heads"] == "3"  # the job's config, resolved

    one_ok = new_parent()
    ok = Tracker(TrackingConfig(uri=uri, experiment_name="units"))
    ok.start(tags={"hydra.job.num": "0"}, parent_run_id=one_ok.run_id)
    ok.log_metrics({"best_val_loss": 4.5}, 1)
    ok.end("FINISHED")
    record_failed_job(_failed_job_config(uri, 1, "model.n_heads=3"), ValueError("x"), one_ok)
    assert close_parent(one_ok) == "FINISHED"
    parent = client.get_run(one_ok.run_id)
    assert parent.data.tags["sweep.failed"] == "1" and parent.data.tags["sweep.jobs"] == "2"
    assert parent.data.tags["sweep.best_run_id"] == ok.run_id
    assert parent.data.metrics["best_val_loss"] == 4.5


def test_a_failed_job_is_one_line_on_the_terminal_and_a_traceback_in_its_log(
    tmp_path, capsys, monkeypatch
):
    """on_job_end as Hydra calls it in the job's process, after its task raised."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(uri=uri, experiment_name="units"))
    run_id = tracker.start(run_name="sweep", tags={"pocketgpt.role": "sweep"})
    write_parent(SweepParent(run_id, tracker.experiment_id, uri, str(tmp_path), ["optim.lr"]))
    config = _failed_job_config(uri, 1, "optim.lr=1e30")
    config.hydra.mode = "RunMode.MULTIRUN"
    config.hydra.sweep = {"dir": str(tmp_path)}
    try:
        raise NonFiniteLossError("the training loss became nan at step 2; lower optim.lr")
    except NonFiniteLossError as e:
        job_return = JobReturn(status=JobStatus.FAILED, _return_value=e)
    root = logging.getLogger()
    job_log = logging.FileHandler(tmp_path / "train.log")
    monkeypatch.setattr(root, "handlers", [job_log])
    capsys.readouterr()  # MLflow's lines on creating the store
    try:
        MlflowSweepCallback().on_job_end(config, job_return)
    finally:
        job_log.close()

    line = (
        "sweep job #1 failed: NonFiniteLossError: the training loss became nan at step 2; "
        f"lower optim.lr (traceback in {tmp_path / 'train.log'})"
    )
    captured = capsys.readouterr()
    assert captured.err == f"error: {line}\n"
    logged = (tmp_path / "train.log").read_text()
    assert "Traceback (most recent call last)" in logged and "raise NonFiniteLossError" in logged
    # What Hydra raises at the end of the sweep: a compact exception, printed without traceback.
    assert isinstance(job_return._return_value, SweepJobFailed)
    assert str(job_return._return_value) == line
    (child,) = children(MlflowClient(uri), read_parent(tmp_path))
    assert child.info.status == "FAILED"
    assert child.data.tags["error"].startswith("NonFiniteLossError: the training loss became nan")


def test_a_sweep_says_where_its_runs_go(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    parent = SweepParent("0123456789abcdef", "1", default, str(tmp_path), ["optim.lr"])
    # No store here yet: compare would not find it, so the line names it (and creates none).
    text = where_runs_go(parent, "pocketgpt", "sweep 2026-01-01/12-00-00")
    assert f"--tracking-uri {default}" in text and not (tmp_path / "mlruns").exists()
    (tmp_path / "mlruns").mkdir()  # the default store of a sweep run from here
    (tmp_path / "mlruns" / "mlflow.db").touch()
    text = where_runs_go(parent, "pocketgpt", "sweep 2026-01-01/12-00-00")
    assert text.splitlines()[:2] == [
        "MLflow sweep: parent run 0123456789abcdef ('sweep 2026-01-01/12-00-00') in experiment "
        f"'pocketgpt' (id 1) at {default}, a child run per job",
        "  compare its jobs: pocketgpt-compare pocketgpt --sweep 01234567",
    ]
    assert "tracking.experiment_name=NAME gives a sweep an experiment of its own" in text
    named = where_runs_go(parent, "lr_sweep", "sweep x")
    assert len(named.splitlines()) == 2 and "--sweep 01234567" in named
