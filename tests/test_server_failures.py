"""A team tracking server that fails a run: one that goes away mid-run (training goes on,
figures wait in the outbox and reach the run when the server is back, or a journal holds them
for pocketgpt-import-journal), and one that wants a login the job does not have."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from pocketgpt.errors import TrackingError
from pocketgpt.tracking.outbox import JOURNAL_NAME, Outbox, read_journal

from .conftest import TINY

# --------------------------------------------------------------------------- the outbox alone


class FlakyStore:
    """Records what reaches it; refuses connections while ``down`` is set."""

    def __init__(self):
        self.received: list[dict] = []
        self.down = threading.Event()
        self.refuse_ops: set[str] = set()

    def send(self, record: dict) -> None:
        if self.down.is_set():
            raise ConnectionError("connection refused")
        if record["op"] in self.refuse_ops:
            raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
        self.received.append(record)


def _metric(step: int) -> dict:
    return {"op": "metrics", "metrics": [["loss", 1.0 / step, 0, step]]}


def test_records_wait_through_an_outage_and_arrive_in_order(tmp_path):
    store = FlakyStore()
    box = Outbox(store.send, tmp_path / JOURNAL_NAME, {"run_id": "r"}, min_backoff=0.01)
    store.down.set()
    for step in range(1, 21):
        box.put(_metric(step))  # returns at once: the caller (the training loop) never waits
    deadline = time.monotonic() + 5
    while box.down_since is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert box.down_since is not None and store.received == []
    box.settle(timeout=5)  # a checkpoint during the outage does not wait for the server
    store.down.clear()
    assert box.close(timeout=10) is None  # all sent: no journal
    assert store.received == [_metric(s) for s in range(1, 21)]
    assert box.down_since is None and not (tmp_path / JOURNAL_NAME).exists()


def test_a_refused_record_is_dropped_not_retried_forever(tmp_path):
    store = FlakyStore()
    store.refuse_ops = {"tags"}
    box = Outbox(store.send, tmp_path / JOURNAL_NAME, {"run_id": "r"})
    box.put({"op": "tags", "tags": {"a": "1"}})
    box.put(_metric(1))
    assert box.close(timeout=10) is None
    assert store.received == [_metric(1)]


def test_a_server_that_never_returns_leaves_a_journal(tmp_path):
    store = FlakyStore()
    store.down.set()
    box = Outbox(store.send, tmp_path / JOURNAL_NAME, {"run_id": "r", "tracking_uri": "u"})
    for step in (1, 2, 3):
        box.put(_metric(step))
    journal = box.close(timeout=0.2)
    header, records = read_journal(journal)
    assert header["run_id"] == "r" and records == [_metric(1), _metric(2), _metric(3)]


def test_a_full_queue_spills_its_oldest_records_to_the_journal(tmp_path):
    store = FlakyStore()
    store.down.set()
    box = Outbox(store.send, tmp_path / JOURNAL_NAME, {"run_id": "r"}, capacity=3)
    for step in range(1, 7):
        box.put(_metric(step))
    assert box.spilled == 3 and box.pending() == 3
    _, records = read_journal(box.close(timeout=0.1))
    assert sorted(r["metrics"][0][3] for r in records) == [1, 2, 3, 4, 5, 6]  # none lost


def test_a_cut_last_line_is_skipped_and_garbage_is_one_error(tmp_path):
    path = tmp_path / JOURNAL_NAME
    path.write_text(json.dumps({"op": "header", "run_id": "r"}) + "\n" + '{"op": "metr')
    assert read_journal(path)[1] == []
    path.write_text("not a journal\n{}\n")
    with pytest.raises(TrackingError, match="not a JSON record"):
        read_journal(path)
    path.write_text("{}\n")
    with pytest.raises(TrackingError, match="no header line"):
        read_journal(path)


# --------------------------------------------------------------------------- a real server


class Server:
    """A real ``mlflow server`` that a test can stop and start again on the same port and
    store (a team server restarted by its admin)."""

    def __init__(self, root: Path, admin_password: str | None = None):
        self.root, self.admin_password = root, admin_password
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        auth = []
        if self.admin_password:  # MLflow's basic-auth app, its admin user made at start
            auth = ["--app-name", "basic-auth"]
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = self.admin_password
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "test-secret"
        self.proc = subprocess.Popen(
            [mlflow, "server", *auth]
            + ["--backend-store-uri", f"sqlite:///{self.root / 'server.db'}"]
            + ["--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"]
            + ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.3)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker
        self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


def _train(tmp_path, shared_cache, server, *extra) -> subprocess.Popen:
    args = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.log_interval"))]
    args += [
        "trainer.max_steps=300",
        "trainer.log_interval=10",
        "trainer.eval_interval=100",
        "trainer.checkpoint_interval=100",
        "trainer.threads=1",
        f"cache_dir={shared_cache}",
        f"tracking.uri={server.url}",
        "tracking.system_metrics=false",
        "hydra.run.dir=job",
        *extra,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "pocketgpt.train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_metrics(server: Server, proc: subprocess.Popen) -> str:
    """Wait for the run's first train_loss point; -> its run id."""
    client = MlflowClient(server.url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("pocketgpt")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].data.metrics.get("train_loss") is not None:
            return runs[0].info.run_id
        time.sleep(0.1)
    raise AssertionError("the run logged no train_loss: " + (proc.stderr.read() or "")[-2000:])


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_a_server_restarted_mid_run_gets_every_figure(tmp_path, shared_cache, server):
    proc = _train(tmp_path, shared_cache, server)
    run_id = _first_metrics(server, proc)
    server.kill()
    killed_at = time.time()
    time.sleep(4)
    assert proc.poll() in (None, 0), proc.stderr.read()[-2000:]  # training went on
    server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "unreachable" in err + out and "back after" in err + out

    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _steps(client, run_id, "train_loss") == list(range(10, 301, 10))
    assert _steps(client, run_id, "val_loss") == [0, 100, 200, 300]
    assert "test_loss" in run.data.metrics and client.search_logged_models([run.info.experiment_id])
    # Points logged while the server was down, each with the time it was logged at.
    times = [m.timestamp / 1000 for m in client.get_metric_history(run_id, "train_loss")]
    assert any(killed_at < t < killed_at + 4 for t in times)


@pytest.mark.slow
def test_a_server_that_stays_down_leaves_a_journal_to_import(tmp_path, shared_cache, server):
    proc = _train(tmp_path, shared_cache, server, "tracking.outage_timeout=1")
    run_id = _first_metrics(server, proc)
    server.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    journal = tmp_path / "job" / JOURNAL_NAME
    assert f"pocketgpt-import-journal {journal}" in out + err
    assert (tmp_path / "job" / "final_model" / "model.safetensors").is_file()

    server.start()
    client = MlflowClient(server.url)
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing reached it
    imported = subprocess.run(
        [sys.executable, "-m", "pocketgpt.cli.import_journal", str(journal)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _steps(client, run_id, "train_loss") == list(range(10, 301, 10))
    assert "test_loss" in run.data.metrics
    assert client.search_logged_models([run.info.experiment_id])  # the final model, logged
    assert not journal.exists() and journal.with_name(JOURNAL_NAME + ".imported").exists()

    again = subprocess.run(
        [sys.executable, "-m", "pocketgpt.cli.import_journal", str(journal)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and again.stderr.count("\n") == 1  # one line: no such file


@pytest.mark.slow
def test_a_server_that_wants_a_login_is_one_clear_error(tmp_path, shared_cache):
    server = Server(tmp_path, admin_password="admin-pass-1234")
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        args = [*TINY, f"cache_dir={shared_cache}", f"tracking.uri={server.url}"]
        for login, says in [({}, "were not given"), (_login("admin", "wrong"), "were refused")]:
            proc = subprocess.run(
                [sys.executable, "-m", "pocketgpt.train", *args],
                cwd=tmp_path,
                env={**env, **login},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert proc.stderr.count("\n") == 1 and "requires a login (HTTP 401)" in proc.stderr
            assert says in proc.stderr and "MLFLOW_TRACKING_USERNAME" in proc.stderr
        os.environ.update(_login("admin", "admin-pass-1234"))
        try:
            client = MlflowClient(server.url)
            assert client.get_experiment_by_name("pocketgpt") is None  # nothing half-made
        finally:
            for k in _login("", ""):
                os.environ.pop(k)
    finally:
        server.kill()


def _login(user: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
