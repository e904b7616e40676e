"""Crash safety: SIGKILL at an arbitrary step, resume, and end bit-identical to an
uninterrupted run; Ctrl-C checkpoints and ends the run KILLED; NaN losses stop cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pocketgpt.checkpoint import list_checkpoints, load_checkpoint
from pocketgpt.errors import NonFiniteLossError
from pocketgpt.train import train

from .conftest import TINY

pytestmark = pytest.mark.slow  # every test here trains, most in subprocesses

# Slow enough per step (tens of ms) that a kill lands mid-run, fast enough for CI.
RESUME = [
    *TINY,
    "model.d_model=64",
    "model.max_len=64",
    "data.block_size=64",
    "trainer.batch_size=16",
    "trainer.max_steps=40",
    "trainer.eval_interval=10",
    "trainer.log_interval=1",
    "trainer.checkpoint_interval=3",
    "model.dropout=0.1",  # exercises the RNG state in the checkpoint
]


def _cli(args, cwd: Path, **kw):
    env = {**os.environ, "POCKETGPT_CACHE_DIR": str(cwd.parent / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pocketgpt.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _history(client, run_id, key):
    """{step: value}, the last value logged at each step (re-run steps log identical values)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "work").mkdir()
    return root / "work"


@pytest.fixture(scope="module")
def reference(workdir):
    """An uninterrupted run: its final checkpoint and MLflow metrics."""
    proc = _cli([*RESUME, "trainer.checkpoint_dir=ref", "tracking.experiment_name=ref"], workdir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return list_checkpoints(workdir / "ref")[-1]


def _run_id(ckpt_path):
    return load_checkpoint(ckpt_path)["meta"]["mlflow_run_id"]


@pytest.mark.parametrize("kill_after", [3, 12, 27])
def test_sigkill_then_resume_is_bit_identical(workdir, reference, kill_after):
    ckpt_dir = workdir / f"killed{kill_after}"
    args = [*RESUME, f"trainer.checkpoint_dir={ckpt_dir.name}", "tracking.experiment_name=killed"]
    proc = _cli(args, workdir)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(int(p.stem.split("-")[1]) >= kill_after for p in list_checkpoints(ckpt_dir)):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(list_checkpoints(ckpt_dir)[-1])["meta"]["step"]
    assert kill_after <= killed_at < 40

    resumed = _cli([*args, "trainer.resume=auto"], workdir)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming MLflow run" in out

    final, ref = load_checkpoint(list_checkpoints(ckpt_dir)[-1]), load_checkpoint(reference)
    assert final["meta"]["step"] == ref["meta"]["step"] == 40
    for name, tensor in ref["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    for a, b in zip(final["optimizer"]["state"].values(), ref["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    run_id, ref_id = final["meta"]["mlflow_run_id"], ref["meta"]["mlflow_run_id"]
    assert run_id == _run_id(list_checkpoints(ckpt_dir)[0])  # the same MLflow run continued
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_bpb", "lr"):
        assert _history(client, run_id, key) == _history(client, ref_id, key), key


def test_sigint_checkpoints_and_marks_the_run_killed(workdir):
    ckpt_dir = workdir / "interrupted"
    args = [
        *RESUME,
        "trainer.max_steps=400",
        f"trainer.checkpoint_dir={ckpt_dir.name}",
        "trainer.checkpoint_interval=1000",
        "tracking.experiment_name=sigint",
    ]
    proc = _cli(args, workdir)
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    deadline = time.time() + 240
    run = None
    while time.time() < deadline and run is None:  # wait until training has logged a step
        time.sleep(0.2)
        exp = client.get_experiment_by_name("sigint")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
            run = runs[0]
    assert run is not None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "trainer.resume=auto" in err and "Traceback" not in err
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    ckpt = load_checkpoint(list_checkpoints(ckpt_dir)[-1])
    assert 0 < ckpt["meta"]["step"] < 400 and not ckpt["meta"]["finished"]


def test_nonfinite_loss_fails_the_run_and_keeps_the_checkpoint(compose_cfg, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_cfg(
        *TINY,
        f"tracking.uri={store}",
        f"cache_dir={tmp_path / 'cache'}",
        f"trainer.checkpoint_dir={tmp_path / 'ckpt'}",
        "trainer.checkpoint_interval=1",
        "trainer.max_steps=50",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "trainer.grad_clip=0",
    )
    with pytest.raises(NonFiniteLossError, match=r"at step \d+.*last good checkpoint"):
        train(cfg)
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("pocketgpt").experiment_id])[0]
    assert run.info.status == "FAILED"
    good = load_checkpoint(list_checkpoints(tmp_path / "ckpt")[-1])
    assert all(torch.isfinite(t).all() for t in good["model"].values())


def test_nonfinite_loss_can_be_skipped(compose_cfg, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_cfg(
        *TINY,
        f"tracking.uri={store}",
        f"cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=12",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "trainer.grad_clip=0",
        "trainer.on_nonfinite=skip",
        "tracking.log_model=false",
    )
    train(cfg)
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("pocketgpt").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["skipped_steps"] > 0


def test_checkpoints_copied_to_mlflow_and_resumable_by_run_id(compose_cfg, tmp_path):
    import shutil

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        *TINY,
        f"tracking.uri={store}",
        f"cache_dir={tmp_path / 'cache'}",
        f"trainer.checkpoint_dir={tmp_path / 'ckpt'}",
        "trainer.checkpoint_interval=2",
        "trainer.checkpoint_to_mlflow=true",
        "tracking.log_model=false",
    ]
    train(compose_cfg(*common))
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("pocketgpt").experiment_id])[0]
    names = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert names == ["checkpoints/ckpt-0000004.pt", "checkpoints/ckpt-0000006.pt"]  # newest 2

    shutil.rmtree(tmp_path / "ckpt")  # only the MLflow copy is left
    train(compose_cfg(*common, f"trainer.resume={run.info.run_id}"))
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same run continued
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def _runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_auto_resume_finds_the_jobs_own_hydra_run_dir(workdir, reference):
    """hydra.run.dir outside ./outputs, no trainer.checkpoint_dir: a restart with the same
    hydra.run.dir and resume=auto continues the same MLflow run from <run dir>/checkpoints."""
    run_dir = workdir.parent / "myrun"
    args = [*RESUME, f"hydra.run.dir={run_dir}", "tracking.experiment_name=rundir"]
    proc = _cli(args, workdir)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(int(p.stem.split("-")[1]) >= 6 for p in list_checkpoints(run_dir / "checkpoints")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["meta"]["step"]
    assert 6 <= killed_at < 40

    resumed = _cli([*args, "trainer.resume=auto"], workdir)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming MLflow run" in out and "starting fresh" not in out

    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    (run,) = _runs(client, "rundir")  # the same run continued, no second one
    assert run.info.status == "FINISHED"
    final = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert final["meta"]["step"] == 40 and final["meta"]["mlflow_run_id"] == run.info.run_id
    ref_id = _run_id(reference)
    for key in ("train_loss", "val_loss"):
        assert _history(client, run.info.run_id, key) == _history(client, ref_id, key), key


def test_run_killed_before_its_first_checkpoint_is_not_left_running(workdir):
    """kill -9 before any checkpoint: the restart (same hydra.run.dir, resume=auto) starts
    fresh and marks the orphaned run KILLED, so no run says RUNNING forever."""
    run_dir = workdir.parent / "early"
    args = [
        *RESUME,
        f"hydra.run.dir={run_dir}",
        "trainer.checkpoint_interval=1000",
        "tracking.experiment_name=early",
    ]
    proc = _cli(args, workdir)
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not _runs(client, "early"):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list_checkpoints(run_dir / "checkpoints")
    (orphan,) = _runs(client, "early")
    assert orphan.info.status == "RUNNING"

    again = _cli([*args, "trainer.resume=auto"], workdir)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert f"marked MLflow run {orphan.info.run_id} KILLED" in out

    runs = {r.info.run_id: r for r in _runs(client, "early")}
    assert len(runs) == 2 and not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert runs[orphan.info.run_id].info.status == "KILLED"
    assert "killed" in runs[orphan.info.run_id].data.tags["pocketgpt.end_reason"]
    (new,) = [r for r in runs.values() if r.info.run_id != orphan.info.run_id]
    assert new.info.status == "FINISHED"


def test_auto_prefers_the_jobs_own_folder(tmp_path):
    """resume=auto takes this job's own checkpoint folder before a newer run elsewhere."""
    import json
    import os

    from pocketgpt.checkpoint import find_resume_checkpoint

    own, other = tmp_path / "own" / "checkpoints", tmp_path / "outputs" / "x" / "checkpoints"
    for i, d in enumerate((own, other)):
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"config_hash": "h", "finished": False}))
        (d / "ckpt-0000003.pt").write_bytes(b"")
        os.utime(d / "ckpt-0000003.pt", (1000 + i, 1000 + i))  # other is newer
    roots = [own, tmp_path / "outputs"]
    assert find_resume_checkpoint("auto", roots, "h") == other / "ckpt-0000003.pt"
    assert find_resume_checkpoint("auto", roots, "h", own=[own]) == own / "ckpt-0000003.pt"
    assert find_resume_checkpoint("auto", roots, "other-hash", own=[own]) is None


def test_muon_and_wsd_resume_bit_identical(compose_cfg, tmp_path):
    """Muon + AdamW with a warmup-stable-decay schedule (and a RoPE, untied-head model):
    resuming from a mid-run checkpoint, inside the cooldown, ends where the uninterrupted run
    ends, weights and both optimizers' states bit for bit."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        *TINY,
        f"tracking.uri={store}",
        f"cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=12",
        "trainer.checkpoint_interval=4",
        "trainer.eval_interval=6",
        "trainer.sample_tokens=0",
        "tracking.log_model=false",
        "tracking.system_metrics=false",
        "optim=muon",
        "optim.schedule=wsd",
        "optim.cooldown_fraction=0.5",
        "model.position=rope",
        "model.tie_embeddings=false",
        "model.dropout=0.1",
    ]
    ckpt_dir = tmp_path / "ckpt"
    train(compose_cfg(*common, f"trainer.checkpoint_dir={ckpt_dir}"))
    last = list_checkpoints(ckpt_dir)[-1]  # the newest two are kept: steps 8 and 12
    ref = load_checkpoint(last)
    last.unlink()  # as if the run had died after step 8
    train(compose_cfg(*common, f"trainer.checkpoint_dir={ckpt_dir}", "trainer.resume=auto"))
    final = load_checkpoint(list_checkpoints(ckpt_dir)[-1])
    assert final["meta"]["step"] == ref["meta"]["step"] == 12
    for name, tensor in ref["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    assert set(ref["optimizer"]) == {"muon", "adamw"}
    for part in ("muon", "adamw"):
        a_states, b_states = final["optimizer"][part]["state"], ref["optimizer"][part]["state"]
        assert a_states.keys() == b_states.keys() and a_states
        for a, b in zip(a_states.values(), b_states.values()):
            assert all(torch.equal(a[k], b[k]) for k in a)
        lrs = [g["lr"] for g in final["optimizer"][part]["param_groups"]]
        assert lrs == [g["lr"] for g in ref["optimizer"][part]["param_groups"]]
