"""Several processes and other launchers: the rank environment, sharded evaluation under a real
gloo process group, and sweeps through Hydra's submitit launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pocketgpt.config import ModelConfig, Strategy
from pocketgpt.data import TokenizedSplit
from pocketgpt.distributed import Distributed, from_environment, resolve_strategy, setup
from pocketgpt.errors import ConfigError
from pocketgpt.evaluation import evaluate
from pocketgpt.model import GPTMini

from .conftest import TINY


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1, 0)),
        ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, (2, 4, 0)),
        ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, (5, 8, 1)),
        # torchrun inside a SLURM allocation: torchrun's variables win
        ({"WORLD_SIZE": "2", "RANK": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, (1, 2, 0)),
    ],
)
def test_rank_from_the_launcher_environment(env, expected):
    assert from_environment(env) == expected


def test_a_garbled_rank_environment_is_one_clear_error():
    with pytest.raises(ConfigError, match="rank.*torchrun --nproc_per_node"):
        from_environment({"WORLD_SIZE": "two"})


@pytest.mark.parametrize(
    "strategy, world, expected",
    [
        ("auto", 1, Strategy.single),
        ("auto", 2, Strategy.ddp),
        ("ddp", 2, Strategy.ddp),
        ("fsdp", 4, Strategy.fsdp),
    ],
)
def test_strategy_resolution(strategy, world, expected):
    assert resolve_strategy(strategy, world) == expected


def test_single_strategy_under_several_processes_is_refused():
    with pytest.raises(ConfigError, match="trainer.strategy=single but the launcher started 2"):
        resolve_strategy("single", 2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_distributed_strategy_without_a_launcher_is_refused(strategy):
    with pytest.raises(ConfigError, match=f"trainer.strategy={strategy} needs several processes"):
        resolve_strategy(strategy, 1)


def test_an_unreachable_rendezvous_is_one_clear_error(monkeypatch):
    port = _free_port()  # closed again: nothing listens there
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port} did not"):
        setup("auto", torch.device("cpu"), rendezvous_timeout=1.0)
    assert time.monotonic() - start < 10


def test_nccl_on_the_cpu_is_one_clear_error(monkeypatch, compose_cfg):
    with pytest.raises(ConfigError, match="dist_backend=nccl with trainer.device=cpu"):
        OmegaConf.to_object(compose_cfg("trainer.device=cpu", "trainer.dist_backend=nccl"))
    # device=auto that lands on the CPU: refused when the process group is set up
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="dist_backend=nccl, but this job runs on cpu"):
        setup("auto", torch.device("cpu"), backend="nccl")


def test_one_process_collectives_are_the_identity():
    d = Distributed()
    assert d.sum([1.5, 2.0]) == [1.5, 2.0]
    assert d.broadcast({"a": 1}) == {"a": 1}
    d.barrier()
    assert d.is_main and not d.active


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model_and_split():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50, d_model=16, n_heads=2, d_ff=32, num_layers=1, max_len=8, dropout=0.0
    )
    tokens = np.random.default_rng(0).integers(0, 50, size=8 * 37 + 1).astype(np.uint16)
    return GPTMini(cfg), TokenizedSplit(tokens, len(tokens) * 3)


def _sharded_eval_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, split = _tiny_model_and_split()
        d = Distributed(rank, world, rank, Strategy.ddp, "gloo")
        result = evaluate(model, split, 8, 3, torch.device("cpu"), dist=d)
        queue.put((rank, result.loss, result.tokens))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process():
    """2 gloo processes, 13 batches of 3 windows (the last one short): each rank evaluates every
    other batch; the all-reduced figures equal the single process's."""
    model, split = _tiny_model_and_split()
    alone = evaluate(model, split, 8, 3, torch.device("cpu"))
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_sharded_eval_worker, args=(r, 2, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, loss, tokens in results:
        assert tokens == alone.tokens == 37 * 8
        assert loss == pytest.approx(alone.loss, rel=1e-6)


@pytest.mark.slow
def test_submitit_local_sweep_lands_under_one_parent(tmp_path):
    """hydra/launcher=local (submitit, each job its own process): 2 child runs, one parent."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "pocketgpt.train",
        "-m",
        "hydra/launcher=local",
        "optim.lr=1e-3,2e-3",
        *TINY,
        f"tracking.uri={store}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("pocketgpt").experiment_id])
    parents = [r for r in runs if r.data.tags.get("pocketgpt.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("pocketgpt.role") == "job"]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.params["optim.lr"] for r in children} == {"0.001", "0.002"}
    assert all(r.info.status == "FINISHED" for r in runs)
    # submitit wrote each job's own logs beside the sweep
    assert list((tmp_path / "multirun" / ".submitit").glob("*/*_log.out"))


# --------------------------------------------------------------------------- torchrun


def _ddp_overrides(tmp_path, shared_cache, store: str, out: str, *extra: str) -> list[str]:
    base = dict(o.split("=", 1) for o in TINY)
    base.update(
        {
            "trainer.log_interval": "1",
            "trainer.eval_max_batches": "3",
            "trainer.threads": "1",
            "model.dropout": "0.0",
            "tracking.uri": store,
            "cache_dir": str(shared_cache),
            "hydra.run.dir": str(tmp_path / out),
        }
    )
    base.update(dict(o.split("=", 1) for o in extra))
    return [f"{k}={v}" for k, v in base.items()]


def _torchrun(tmp_path, overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, f"--nproc_per_node={nproc}", "-m", "pocketgpt.train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def _the_run(store: str):
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("pocketgpt").experiment_id])
    assert len(runs) == 1  # rank 0 alone tracks: one run
    return client, runs[0]


def _history(client, run, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ("trainer.strategy=ddp",),
        ("trainer.strategy=ddp", "trainer.grad_accum=2"),
        ("trainer.strategy=fsdp",),
    ],
    ids=["ddp", "ddp-grad-accum", "fsdp"],
)
def test_two_processes_reproduce_one(tmp_path, shared_cache, extra):
    """torchrun with 2 gloo processes and the same global batch: the single process's losses
    (float summation order aside), one MLflow run, a checkpoint one process loads."""
    one, two = f"sqlite:///{tmp_path / 'one.db'}", f"sqlite:///{tmp_path / 'two.db'}"
    cmd = [sys.executable, "-m", "pocketgpt.train"]
    single = [o for o in extra if "strategy" not in o]
    args = _ddp_overrides(tmp_path, shared_cache, one, "one", *single)
    proc = subprocess.run(cmd + args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _torchrun(tmp_path, _ddp_overrides(tmp_path, shared_cache, two, "two", *extra))

    (c1, r1), (c2, r2) = _the_run(one), _the_run(two)
    for key in ("train_loss", "val_loss", "grad_norm"):
        h1, h2 = _history(c1, r1, key), _history(c2, r2, key)
        assert [s for s, _ in h1] == [s for s, _ in h2] and h1, key
        for (_, a), (_, b) in zip(h1, h2):
            assert b == pytest.approx(a, rel=1e-5), key
    assert r2.data.metrics["test_loss"] == pytest.approx(r1.data.metrics["test_loss"], rel=1e-5)
    assert r2.info.status == "FINISHED"

    # Rank 0's output folder holds the job; a checkpoint of the whole model, which one
    # process loads, names the run.
    ckpt = max((tmp_path / "two" / "checkpoints").glob("ckpt-*.pt"))
    state = torch.load(ckpt, weights_only=False)
    assert state["meta"]["mlflow_run_id"] == r2.info.run_id
    cfg = ModelConfig(
        vocab_size=300, d_model=32, n_heads=2, d_ff=64, num_layers=2, max_len=32, dropout=0.0
    )
    GPTMini(cfg).load_state_dict(state["model"])
    assert (tmp_path / "two" / ".hydra").is_dir()


@pytest.mark.slow
def test_a_batch_that_does_not_divide_among_ranks_is_refused(tmp_path, shared_cache):
    store = f"sqlite:///{tmp_path / 'x.db'}"
    args = _ddp_overrides(tmp_path, shared_cache, store, "x", "trainer.batch_size=3")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node=2", "-m", "pocketgpt.train", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "trainer.batch_size=3 (the global batch) does not divide among 2 processes" in (
        proc.stdout + proc.stderr
    )
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("pocketgpt")
    assert exp is None or not client.search_runs([exp.experiment_id])  # no run left behind


@pytest.mark.slow
def test_a_killed_rank_resumes_into_the_same_run(tmp_path, shared_cache):
    """kill -9 one rank after the first checkpoint (torchrun then stops the other); the same
    command with trainer.resume=auto continues the same MLflow run to the end."""
    store = f"sqlite:///{tmp_path / 'r.db'}"
    args = _ddp_overrides(
        tmp_path,
        shared_cache,
        store,
        "job",
        "trainer.max_steps=300",
        "trainer.eval_interval=100",
        "trainer.checkpoint_interval=5",
        "trainer.resume=auto",
        "tracking.log_model=false",
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", "-m", "pocketgpt.train", *args]
    first = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    checkpoints = tmp_path / "job" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("ckpt-*.pt")) and first.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    assert first.poll() is None, "the job ended before it could be killed"
    rank1 = _rank_process(first.pid, rank=1)
    os.kill(rank1, signal.SIGKILL)
    first.wait(timeout=120)
    assert first.returncode != 0
    client, run = _the_run(store)
    assert run.info.status != "FINISHED"

    second = _torchrun(tmp_path, args)
    assert "resuming MLflow run " + run.info.run_id in second.stdout
    client, resumed = _the_run(store)  # still one run
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    steps = [s for s, _ in _history(client, resumed, "train_loss")]
    assert steps[-1] == 300


@pytest.mark.slow
def test_sigterm_under_torchrun_checkpoints_and_ends_the_run_killed(tmp_path, shared_cache):
    """SIGTERM to torchrun (a scheduler's stop) reaches every rank: the ranks agree to stop,
    rank 0 writes a checkpoint of the step reached and ends the run KILLED."""
    store = f"sqlite:///{tmp_path / 't.db'}"
    args = _ddp_overrides(
        tmp_path,
        shared_cache,
        store,
        "job",
        "trainer.max_steps=100000",
        "trainer.checkpoint_interval=100000",
        "trainer.log_interval=1",
        "tracking.log_model=false",
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    job = subprocess.Popen(
        [torchrun, "--nproc_per_node=2", "-m", "pocketgpt.train", *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log_file = tmp_path / "job" / "train.log"  # rank 0's job log: the banner, then steps
    deadline = time.monotonic() + 300
    while not (log_file.exists() and "parameters" in log_file.read_text()):
        assert job.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.3)
    time.sleep(2)  # a few steps in
    job.send_signal(signal.SIGTERM)
    job.wait(timeout=120)
    client, run = _the_run(store)
    assert run.info.status == "KILLED"
    ckpt = max((tmp_path / "job" / "checkpoints").glob("ckpt-*.pt"))
    step = torch.load(ckpt, weights_only=False)["meta"]["step"]
    assert 0 < step < 100000 and step >= max(s for s, _ in _history(client, run, "train_loss"))


def _rank_process(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (from /proc: its children's environment)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} worker under torchrun {torchrun_pid}")


# --------------------------------------------------------------------------- a team server


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts proxied to tmp_path)."""
    port = _free_port()
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [mlflow, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
        + ["--artifacts-destination", str(tmp_path / "server-artifacts"), "--serve-artifacts"]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
def test_a_team_server_works_like_the_local_store(tmp_path, shared_cache, mlflow_server):
    """Over HTTP: a run with a registered alias, a joblib sweep with parent and children,
    generation from models:/NAME@ALIAS and compare, as with the local SQLite store."""
    base = [o for o in TINY if not o.startswith("trainer.max_steps")]
    base += ["trainer.max_steps=4", "trainer.threads=1", f"cache_dir={shared_cache}"]
    base += [f"tracking.uri={mlflow_server}"]
    py = [sys.executable, "-m"]

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*py, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc

    run("pocketgpt.train", *base, "tracking.register_as=team@best", "hydra.run.dir=single")
    run(
        "pocketgpt.train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optim.lr=1e-3,2e-3",
        *base,
        "tracking.log_model=false",
        "tracking.experiment_name=team_sweep",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    )
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("team_sweep").experiment_id])
    parent = [r for r in runs if r.data.tags.get("pocketgpt.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("pocketgpt.role") == "job"]
    assert len(parent) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    assert client.get_model_version_by_alias("team", "best").version == "1"

    out = run(
        "pocketgpt.generate",
        "model_uri=models:/team@best",
        f"tracking_uri={mlflow_server}",
        "max_new_tokens=5",
        "prompt=Hello",
    )
    assert out.stdout.startswith("Hello")
    table = run(
        "pocketgpt.compare",
        "team_sweep",
        "--sweep",
        "latest",
        "--tracking-uri",
        mlflow_server,
        "--plot",
        str(tmp_path / "p.png"),
    )
    assert "optim.lr" in table.stdout and table.stdout.count("FINISHED") == 2
