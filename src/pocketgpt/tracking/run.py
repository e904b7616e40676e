"""One training run in MLflow, through an explicit client (no global active run).

The store is ``pocketgpt.tracking.store``'s: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
else SQLite in ``./mlruns``; a tracking server works the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from pocketgpt.config import TrackingConfig
from pocketgpt.errors import TrackingError
from pocketgpt.tracking.outbox import JOURNAL_NAME, Outbox, read_journal
from pocketgpt.tracking.store import (
    artifact_location,
    check_reachable,
    make_client,
    tracking_uri,
)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'c': [1, 2]} -> {'a.b': 1, 'c': '[1, 2]'}"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str | int | float | bool) or v is None else str(v)
    return out


def git_state(cwd: str | os.PathLike | None = None) -> dict[str, str]:
    """The commit and dirty flag of the source tree, when it is a git checkout."""
    root = Path(cwd) if cwd else Path(__file__).resolve().parent  # any folder of the checkout
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {
        "mlflow.source.git.commit": commit.stdout.strip(),
        "git.dirty": str(bool(status.stdout.strip())).lower(),
    }


# The MLflow UI opens an experiment of this kind on its model-training views.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DIGEST_CHARS = 16  # MLflow stores dataset digests in a 36-character column
SOURCE_NAME = "pocketgpt.train"  # the runs table's Source column
SEND_TIMEOUT = 10.0  # seconds one buffered send to a tracking server may take
MONITOR_STOP_WAIT = 10.0  # seconds the end of a run waits for the system-metrics thread
SETTLE_TIMEOUT = 30.0  # seconds a checkpoint waits for the figures before it (server up)


def source_tags() -> dict[str, str]:
    """Where a run came from, in MLflow's own tags (Source and User columns of the UI)."""
    import getpass

    from mlflow.entities import SourceType

    tags = {
        "mlflow.source.name": SOURCE_NAME,
        "mlflow.source.type": SourceType.to_string(SourceType.LOCAL),
    }
    with contextlib.suppress(KeyError, OSError):  # no user name for this uid (containers)
        tags["mlflow.user"] = getpass.getuser()
    return tags


class Tracker:
    """One MLflow run: params, metrics, tags, artifacts, and a guaranteed final status."""

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.uri = tracking_uri(cfg.uri)
        self._client = None  # made on first use: ranks other than 0 never open the store
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._system_metrics = None  # MLflow's SystemMetricsMonitor while a run is live
        # Where the run's unsent figures go if the server is away at its end (the job's output
        # folder; train.run sets it), and the queue that sends them meanwhile.
        self.journal_dir: Path | None = None
        self._outbox: Outbox | None = None
        self.journal: Path | None = None  # set by end() when figures could not be sent

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.uri)
        return self._client

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment_name
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                if EXPERIMENT_KIND_TAG not in exp.tags:  # made by hand or by an older pocketgpt
                    self.client.set_experiment_tag(
                        exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                    )
                return exp.experiment_id
            return self.client.create_experiment(
                name,
                artifact_location=artifact_location(self.uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException as e:
            if "already exists" in str(e):  # another job of a parallel sweep created it first
                return self.client.get_experiment_by_name(name).experiment_id
            raise TrackingError(f"MLflow store {self.uri} failed: {e}") from None

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Fail fast when a tracking server does not answer (MLflow itself retries for minutes)."""
        check_reachable(
            self.uri,
            error=TrackingError,
            hint="start it, or use tracking.uri=null for the local store",
            timeout=timeout,
        )

    def resume(self, run_id: str) -> bool:
        """Continue an existing run (after a crash); False when this store does not have it."""
        from mlflow.exceptions import MlflowException

        self.check_reachable()
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        self._start_system_metrics(resume=True)
        self._open_outbox()
        return True

    def start(
        self,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        self.check_reachable()
        self.experiment_id = self._experiment_id()
        all_tags = {**source_tags(), **git_state(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        self._start_system_metrics(resume=False)
        self._open_outbox()
        return self.run_id

    def _open_outbox(self) -> None:
        """From here on, figures and checkpoint uploads go through the outbox's thread."""
        if self.journal_dir is None:
            return  # no output folder to fall back on: every call goes straight to the store
        self._outbox = Outbox(
            self.send,
            self.journal_dir / JOURNAL_NAME,
            header={"run_id": self.run_id, "tracking_uri": self.uri},
        )

    @property
    def offline(self) -> bool:
        """True once the end of the run found the server still away: what is left of the run
        goes to the journal."""
        return self.journal is not None

    def flush(self) -> bool:
        """Wait (up to tracking.outage_timeout) for the buffered figures to reach the store;
        False when the server is still away: the run's records then go to the journal."""
        if self._outbox is None:
            return True
        if not self._outbox.flush(self.cfg.outage_timeout):
            self.journal = self._outbox.close(timeout=0.0)
            self._outbox = None
            return False
        return True

    def _record(self, record: dict[str, Any]) -> None:
        """Send now, queue it (during the run), or journal it (the server went away)."""
        if self._outbox is not None:
            self._outbox.put(record)
        elif self.journal is not None:
            _append_journal(self.journal, record)
        else:
            self.send(record)

    def _log_batch_once(self, metrics: list[list], tags: dict[str, str]) -> None:
        """MLflow's log-batch REST call, tried once: the outbox retries with its own backoff,
        where the client's retries would hold the sender for minutes before an outage shows."""
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        endpoint = "/api/2.0/mlflow/runs/log-batch"
        body = {
            "run_id": self.run_id,
            "metrics": [
                {"key": k, "value": v, "timestamp": ts, "step": step} for k, v, ts, step in metrics
            ],
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        response = http_request(
            get_default_host_creds(self.uri),
            endpoint,
            "POST",
            max_retries=0,
            timeout=SEND_TIMEOUT,
            json=body,
        )
        verify_rest_response(response, endpoint)

    def settle(self) -> None:
        """Before a checkpoint: the figures logged so far reach the store (unless it is away)."""
        if self._outbox is not None:
            self._outbox.settle(timeout=SETTLE_TIMEOUT)

    def journal_model(
        self, folder: Path, tokenizer: Path, step: int, register_as: str | None
    ) -> None:
        """Record the final model (a folder from model_io.save_model) for a later log_model."""
        self._record(
            {
                "op": "model",
                "folder": str(Path(folder).resolve()),
                "tokenizer": str(Path(tokenizer).resolve()),
                "step": step,
                "register_as": register_as,
            }
        )

    def send(self, record: dict[str, Any]) -> None:
        """Deliver one outbox record to the store (raises what MLflow raises)."""
        from mlflow.entities import Metric, RunTag

        op = record["op"]
        if op in ("metrics", "tags") and self.uri.startswith(("http://", "https://")):
            self._log_batch_once(record.get("metrics", []), record.get("tags", {}))
        elif op == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
            self.client.log_batch(self.run_id, metrics=metrics)
        elif op == "tags":
            tags = [RunTag(k, v) for k, v in record["tags"].items()]
            self.client.log_batch(self.run_id, tags=tags)
        elif op == "artifact":
            self._log_artifact_now(record["path"], record["artifact_path"])
        elif op == "prune":
            self._keep_newest_now(record["artifact_dir"], record["keep"])
        elif op == "model":
            from pocketgpt.loading import load_files
            from pocketgpt.tracking.pyfunc import log_model

            loaded = load_files(Path(record["folder"]), Path(record["tokenizer"]))
            log_model(
                self.client,
                self.run_id,
                loaded.model,
                Path(record["tokenizer"]),
                step=record["step"],
                register_as=record["register_as"],
            )
        elif op == "end":
            self.client.set_terminated(self.run_id, status=record["status"])
        else:
            raise TrackingError(f"unknown tracking record {op!r}; was it written by pocketgpt?")

    def _start_system_metrics(self, resume: bool) -> None:
        """MLflow's own sampler (a daemon thread) logs system/* metrics until ``end``."""
        if not self.cfg.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:  # psutil is missing
            print(
                f"tracking.system_metrics: not logged ({e}); pip install psutil, or set "
                "tracking.system_metrics=false",
                flush=True,
            )
            return
        # Its start/stop/"no GPU" INFO lines would land in every job's log.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._system_metrics = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.cfg.system_metrics_interval,
            resume_logging=resume,
            tracking_uri=self.uri,
        )
        self._system_metrics.start()

    def log_corpus(
        self, corpus_name: str, fingerprint: str, source_type: str, splits: dict[str, dict]
    ) -> None:
        """Each split as an MLflow dataset input (the runs table's Dataset column): name
        ``CORPUS/SPLIT``, digest the corpus fingerprint, its source, and a profile of
        ``splits[split]`` (e.g. bytes, lines, tokens); the split is the input's context."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for split, info in splits.items():
            profile = {k: v for k, v in info.items() if k != "source"}
            dataset = Dataset(
                name=f"{corpus_name}/{split}",
                digest=fingerprint[:DIGEST_CHARS],
                source_type=source_type,
                source=json.dumps({"uri": info["source"]}),
                profile=json.dumps(profile),
            )
            inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)]))
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as e:
            # Parallel jobs of a sweep insert the same datasets at once and one loses the race
            # on MLflow's unique key; once the winner's rows exist, logging them again links them.
            if "UNIQUE constraint" not in str(e):
                raise
            time.sleep(0.5)
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's per-request cap on params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [[k, float(v), now, step] for k, v in metrics.items()]
        self._record({"op": "metrics", "metrics": batch})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._record({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(
        self, path: str | os.PathLike, artifact_path: str | None = None, buffered: bool = False
    ) -> None:
        """Upload a file or folder; ``buffered``: through the outbox (a checkpoint during
        training), else now."""
        if buffered or self.offline:
            record = {"op": "artifact", "path": str(path), "artifact_path": artifact_path}
            self._record(record)
        else:
            self._log_artifact_now(str(path), artifact_path)

    def _log_artifact_now(self, path: str, artifact_path: str | None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, path, artifact_path)
        elif Path(path).is_file():
            self.client.log_artifact(self.run_id, path, artifact_path)
        else:
            raise FileNotFoundError(path)

    def keep_newest_artifacts(self, artifact_dir: str, keep: int) -> None:
        """Delete all but the newest ``keep`` files (by name) in one artifact folder (after
        the uploads queued before it)."""
        self._record({"op": "prune", "artifact_dir": artifact_dir, "keep": keep})

    def _keep_newest_now(self, artifact_dir: str, keep: int) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        files = sorted(a.path for a in self.client.list_artifacts(self.run_id, artifact_dir))
        if len(files) <= keep:
            return
        repo = get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri)
        for path in files[:-keep]:
            repo.delete_artifacts(path)

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` once its figures are sent; with the server still away
        after tracking.outage_timeout, the rest goes to the journal (``self.journal``)."""
        monitor, self._system_metrics = self._system_metrics, None
        if self.run_id is None:
            return
        self.flush()
        if monitor is not None:
            _stop_monitor(monitor, wait=0.0 if self.offline else MONITOR_STOP_WAIT)
        if self._outbox is not None:
            # Spilled records (a queue that overflowed) make the journal the run's tail too.
            self.journal = self._outbox.close(timeout=self.cfg.outage_timeout)
            self._outbox = None
        self._record({"op": "end", "status": status})

    def run_url(self) -> str:
        """Where the run is: ``experiment 'NAME' (id ID), run RUN_ID in URI``."""
        return (
            f"experiment {self.cfg.experiment_name!r} (id {self.experiment_id}), "
            f"run {self.run_id} in {self.uri}"
        )


def _stop_monitor(monitor: Any, wait: float) -> None:
    """Stop MLflow's system-metrics thread and flush its last samples, unless it is still
    inside MLflow's retries after ``wait`` s (a server that was away): then leave it, a daemon.
    (``SystemMetricsMonitor.finish`` alone would join it for as long as those retries last.)"""
    monitor._shutdown_event.set()
    thread = monitor._process
    if thread is not None:
        thread.join(timeout=wait)
        if thread.is_alive():
            return
    monitor.finish()


def import_journal(path: Path, uri: str | None = None) -> str:
    """Send a journal's records to its run (in ``uri``, else the run's own store); the
    journal is renamed ``*.imported`` so a second import cannot repeat it. -> the run id."""
    header, records = read_journal(path)
    tracker = Tracker(TrackingConfig(uri=uri or header.get("tracking_uri"), system_metrics=False))
    tracker.check_reachable()
    tracker.run_id = header["run_id"]
    for record in records:
        tracker.send(record)
    path.rename(path.with_name(path.name + ".imported"))
    return tracker.run_id


def _append_journal(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- orphaned runs
# A job killed with kill -9 (or a power loss) cannot end its run; the next job that starts in
# the same checkpoint folder ends it, so no run says RUNNING forever.

CHECKPOINT_DIR_TAG = "pocketgpt.checkpoint_dir"
HOST_TAG, PID_TAG = "pocketgpt.host", "pocketgpt.pid"
END_REASON_TAG = "pocketgpt.end_reason"


def process_tags() -> dict[str, str]:
    """Where this job runs (host, process id), as run tags: how a later job tells a run whose
    process is gone from one still training."""
    import socket

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def end_orphaned_runs(tracker: Any, checkpoint_dir: str | os.PathLike, keep: str) -> list[str]:
    """Mark KILLED the runs of this job's experiment left RUNNING by a job that was killed
    (``kill -9``, power loss) before it could end its run, and that wrote into the same
    checkpoint folder as this job; returns their ids.

    Only runs tagged with this very checkpoint folder are touched: two live jobs cannot
    share one (each would overwrite the other's checkpoints). A run whose recorded process is
    still alive on this host is left alone all the same. ``keep`` is this job's own run.
    """
    from mlflow.entities import RunStatus

    if tracker.experiment_id is None:
        return []
    target = str(Path(checkpoint_dir).resolve())
    host, pid = process_tags()[HOST_TAG], os.getpid()
    ended, token = [], None
    while True:
        page = tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string="attributes.status = 'RUNNING'",
            max_results=1000,
            page_token=token,
        )
        for run in page:
            tags = run.data.tags
            if run.info.run_id == keep or tags.get(CHECKPOINT_DIR_TAG) != target:
                continue
            if tags.get(HOST_TAG) == host and _alive(tags.get(PID_TAG), pid):
                continue
            tracker.client.set_tag(
                run.info.run_id,
                END_REASON_TAG,
                f"its job was killed before it ended the run; marked KILLED by run {keep}, "
                f"which started in the same checkpoint folder",
            )
            tracker.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            ended.append(run.info.run_id)
        token = page.token
        if not token:
            return ended


def _alive(pid_tag: str | None, own_pid: int) -> bool:
    """Whether the process a run recorded may still be running: it exists, is not this one,
    and (where /proc tells) is a Python/pocketgpt process."""
    try:
        pid = int(pid_tag or "")
    except ValueError:
        return False
    if pid <= 0 or pid == own_pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"pocketgpt" in cmdline or b"python" in cmdline
