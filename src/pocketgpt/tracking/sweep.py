"""Sweeps: one MLflow parent run per Hydra multirun, every job a child run nested under it.

``MlflowSweepCallback`` is a Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``):

- ``on_multirun_start`` (the launching process) creates the parent run in the sweep's experiment
  (``tracking.experiment_name``, the same as a single run's: the parent run is what keeps a
  sweep together), tagged with the sweep directory and overrides, writes ``mlflow_sweep.json``
  into the sweep directory and says on the terminal where the runs go. Jobs find their parent
  through that file, so it works for any launcher: in-process (basic), other processes
  (joblib/loky) or other machines sharing the folder.
- ``on_job_start`` gives the job its ``progress.JobSlot``: its bar on its own terminal line, its
  console lines behind its number (parallel jobs share one terminal).
- ``train()`` calls ``sweep_parent()`` and starts its run as a child of that parent.
- ``on_job_end`` (wherever the job ran) records a failed job: its child run gets the ``error``
  tag and ends FAILED; a job that failed before its run started (a config error, a missing file)
  gets a FAILED child run of its own, so every job of the sweep has exactly one child run. The
  terminal gets one line naming the job and its error, the job's log file the traceback, and
  the sweep goes on; Hydra's end-of-sweep report of the failure is that line too.
- ``on_multirun_end`` closes the parent: FAILED when every child failed (or none ran),
  else FINISHED, with the sweep's best child in its metrics and tags. Hydra's basic sweeper
  raises after the whole batch has run when any job failed, and then skips
  ``on_multirun_end``; an ``atexit`` hook closes the parent in that case too.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pocketgpt import __version__
from pocketgpt.atomic import atomic_write_text
from pocketgpt.config import TrackingConfig
from pocketgpt.progress import JobSlot, set_job_slot, use_job_console

PARENT_FILE = "mlflow_sweep.json"
ROLE_TAG = "pocketgpt.role"  # "sweep" on parent runs, "job" on their children
ERROR_TAG = "error"
MAX_TAG = 5000


@dataclass(frozen=True)
class SweepParent:
    """The MLflow parent run of one sweep, as written to ``<sweep dir>/mlflow_sweep.json``."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    sweep_dir: str
    sweep_keys: list[str] = field(default_factory=list)  # the keys the sweep varies

    def child_name(self, overrides: list[str], job_num: int | None) -> str:
        """'#2 optim.lr=0.003 model.num_layers=4': the job number and the overrides it varies."""
        varied = [o for o in overrides if _override_key(o) in self.sweep_keys]
        return " ".join([f"#{job_num}", *varied]) if job_num is not None else " ".join(varied)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def write_parent(parent: SweepParent) -> Path:
    path = Path(parent.sweep_dir) / PARENT_FILE
    atomic_write_text(path, json.dumps(asdict(parent), indent=2) + "\n")
    return path


def read_parent(sweep_dir: str | os.PathLike) -> SweepParent | None:
    path = Path(sweep_dir) / PARENT_FILE
    if not path.is_file():
        return None
    return SweepParent(**json.loads(path.read_text(encoding="utf-8")))


def sweep_parent() -> SweepParent | None:
    """The parent run of the sweep this Hydra job belongs to; None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return None
    return read_parent(hc.sweep.dir)


def child_run_kwargs(run_name: str | None, tags: dict[str, str], hydra_ctx: dict) -> dict:
    """``Tracker.start`` arguments for a job: nested under the sweep's parent in a multirun."""
    parent = sweep_parent() if hydra_ctx.get("multirun") else None
    if parent is None:
        return {"run_name": run_name, "tags": tags}
    return {
        "run_name": run_name or parent.child_name(hydra_ctx["overrides"], hydra_ctx["job_num"]),
        "tags": {**tags, ROLE_TAG: "job"},
        "parent_run_id": parent.run_id,
    }


def sweep_keys(overrides: list[str], params: dict[str, Any] | None) -> list[str]:
    """The config keys a sweep varies: sweep overrides (a=1,2) and hydra.sweeper.params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [str(k) for k in (params or {})]
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            keys.append(o.key_or_group)
    return sorted(set(keys))


def error_message(exc: BaseException) -> str:
    """One line: 'ConfigError: model.d_model=32 is not divisible by model.n_heads=3'."""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"[:MAX_TAG]


def _tracking_cfg(config: DictConfig) -> TrackingConfig:
    node = config.get("tracking")
    if node is None:
        return TrackingConfig()
    return TrackingConfig(
        **{k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
    )


def _is_multirun(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.mode")) == "RunMode.MULTIRUN"


def parallel_jobs(config: DictConfig) -> int:
    """How many jobs the sweep's launcher runs at once (joblib's n_jobs; 1 for the others)."""
    n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    # joblib's convention: -1 is every CPU, -2 all but one, ...
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


def job_slot_of(config: DictConfig) -> JobSlot:
    """A sweep job's label and bar line: '#3', and 3 modulo the jobs run at once."""
    num = OmegaConf.select(config, "hydra.job.num", default=0)
    return JobSlot(label=f"#{num}", position=int(num) % parallel_jobs(config))


class SweepJobFailed(CompactHydraException):
    """A failed sweep job as one line; Hydra prints a CompactHydraException without a traceback."""


def _log_traceback(exc: BaseException, message: str) -> list[str]:
    """Write the job's traceback to its log files (not to the console); returns their paths."""
    logger = logging.getLogger(__name__)
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 0, message, (), (type(exc), exc, exc.__traceback__)
    )
    files = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
            handler.flush()
            files.append(handler.baseFilename)
    return files


def children(client: Any, parent: SweepParent) -> list[Any]:
    """Every child run of the sweep, in job order."""
    runs = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
        max_results=10000,
    )
    return sorted(runs, key=lambda r: _job_num(r.data.tags.get("hydra.job.num")))


def _job_num(tag: str | None) -> float:
    return int(tag) if tag and tag.isdigit() else math.inf


def _metric(run: Any, key: str) -> float:
    value = run.data.metrics.get(key)
    return float(value) if value is not None and math.isfinite(value) else math.inf


def close_parent(parent: SweepParent) -> str | None:
    """End the parent run from its children's statuses; a no-op once it has ended.

    FAILED when every child failed or none ran, KILLED when a child was killed or never ended,
    else FINISHED. Returns the status set, or None when the parent had already ended.
    """
    from pocketgpt.tracking.store import make_client

    client = make_client(parent.tracking_uri)
    if client.get_run(parent.run_id).info.status != "RUNNING":
        return None
    runs = children(client, parent)
    statuses = [r.info.status for r in runs]
    failed = statuses.count("FAILED")
    if not runs or failed == len(runs):
        status = "FAILED"
    elif any(s in ("KILLED", "RUNNING", "SCHEDULED") for s in statuses):
        status = "KILLED"
    else:
        status = "FINISHED"
    tags = {"sweep.jobs": str(len(runs)), "sweep.failed": str(failed)}
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        best = min(finished, key=lambda r: _metric(r, "best_val_loss"))
        tags["sweep.best_run_id"] = best.info.run_id
        tags["sweep.best_run_name"] = best.info.run_name or ""
        metrics = {
            k: best.data.metrics[k]
            for k in ("best_val_loss", "val_loss", "val_bpb")
            if k in best.data.metrics
        }
        for key, value in metrics.items():
            client.log_metric(parent.run_id, key, value)
    for key, value in tags.items():
        client.set_tag(parent.run_id, key, value)
    client.set_terminated(parent.run_id, status=status)
    return status


def record_failed_job(config: DictConfig, exc: BaseException, parent: SweepParent) -> str:
    """Mark this job's child run FAILED with the error; create one if the job never started it.

    Returns the child run id.
    """
    from pocketgpt.tracking.run import Tracker, flatten

    job_num = OmegaConf.select(config, "hydra.job.num")
    overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=[])]
    message = error_message(exc)
    try:
        tracking = _tracking_cfg(config)
    except Exception:  # the tracking config itself may be what broke
        tracking = TrackingConfig()
    tracking = TrackingConfig(**{**asdict(tracking), "uri": tracking.uri or parent.tracking_uri})
    tracker = Tracker(tracking)
    experiment = tracker.client.get_experiment_by_name(tracking.experiment_name)
    found = []
    if experiment is not None:
        found = tracker.client.search_runs(
            [experiment.experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{parent.run_id}' and "
                f"tags.`hydra.job.num` = '{job_num}'"
            ),
            max_results=1,
        )
    if found:
        run_id = found[0].info.run_id
        tracker.client.set_tag(run_id, ERROR_TAG, message)
        if found[0].info.status != "FAILED":
            tracker.client.set_terminated(run_id, status="FAILED")
        return run_id

    tags = {
        ROLE_TAG: "job",
        ERROR_TAG: message,
        "pocketgpt.version": __version__,
        "hydra.overrides": " ".join(overrides) or "(none)",
        "hydra.job.num": str(job_num),
    }
    tracker.start(
        run_name=tracking.run_name or parent.child_name(overrides, job_num),
        tags=tags,
        parent_run_id=parent.run_id,
    )
    try:
        task = {k: v for k, v in config.items() if k != "hydra"}
        params = flatten(OmegaConf.to_container(OmegaConf.create(task), resolve=True))
    except Exception:  # an interpolation that cannot resolve: log the overrides as given
        params = dict(o.split("=", 1) for o in overrides if "=" in o)
    tracker.log_params(params)
    tracker.end("FAILED")
    return tracker.run_id


class MlflowSweepCallback(Callback):
    """Hydra callback: a parent MLflow run per multirun, failed jobs recorded as FAILED children.

    Holds nothing but its settings, so launchers can pickle it into other processes.
    """

    def __init__(self, run_name_prefix: str = "sweep") -> None:
        self.run_name_prefix = run_name_prefix

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pocketgpt.tracking.run import Tracker

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        overrides = [str(o) for o in config.hydra.overrides.task]
        params = OmegaConf.to_container(config.hydra.sweeper, resolve=False).get("params")
        tracking = _tracking_cfg(config)
        tracker = Tracker(tracking)  # creates the store and the experiment before any job runs
        tags = {
            ROLE_TAG: "sweep",
            "pocketgpt.version": __version__,
            "sweep.dir": str(sweep_dir),
            "sweep.overrides": " ".join(overrides) or "(none)",
            "sweep.sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_")),
            "sweep.launcher": str(OmegaConf.select(config, "hydra.launcher._target_")),
        }
        if params:
            tags["sweep.params"] = json.dumps(params)[:MAX_TAG]
        name = f"{self.run_name_prefix} {sweep_dir.parent.name}/{sweep_dir.name}"
        run_id = tracker.start(run_name=name, tags=tags)
        parent = SweepParent(
            run_id=run_id,
            experiment_id=str(tracker.experiment_id),
            tracking_uri=tracker.uri,
            sweep_dir=str(sweep_dir),
            sweep_keys=sweep_keys(overrides, params),
        )
        write_parent(parent)
        # Hydra skips on_multirun_end when the sweep raises (the basic sweeper does after a
        # failed job); the parent is closed at exit then. A second close is a no-op.
        atexit.register(_close_quietly, parent)
        print(where_runs_go(parent, tracking.experiment_name, name), flush=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        slot = job_slot_of(config)
        set_job_slot(slot)
        use_job_console(slot)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        set_job_slot(None)
        if job_return.status != JobStatus.FAILED:
            return
        # JobReturn.return_value re-raises a failed job's exception; the raw value holds it.
        exc = job_return._return_value
        if not isinstance(exc, BaseException):
            exc = RuntimeError(str(exc))
        parent = read_parent(str(config.hydra.sweep.dir))
        if parent is not None:
            try:
                record_failed_job(config, exc, parent)
            except Exception as e:  # never let bookkeeping hide the job's own error
                print(f"warning: could not record the failed job in MLflow: {e}", flush=True)
        line = f"sweep job {job_slot_of(config).label} failed: {error_message(exc)}"
        files = _log_traceback(exc, line)
        if files:
            line += f" (traceback in {', '.join(files)})"
        print(f"error: {line}", file=sys.stderr, flush=True)
        # Hydra re-raises the first failed job's exception once the batch has run, with a
        # traceback; as a CompactHydraException it is this one line instead. HYDRA_FULL_ERROR=1
        # keeps the original exception and its traceback.
        if os.environ.get("HYDRA_FULL_ERROR") != "1":
            job_return.return_value = SweepJobFailed(line)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = read_parent(Path(str(config.hydra.sweep.dir)).resolve())
        if parent is not None:
            status = close_parent(parent)
            if status:
                print(f"MLflow sweep: parent run {parent.run_id} {status}", flush=True)


def where_runs_go(parent: SweepParent, experiment: str, run_name: str) -> str:
    """The lines that open a sweep: where its runs go, and how to compare them."""
    from pocketgpt.errors import TrackingError
    from pocketgpt.tracking.store import tracking_uri

    try:  # the store pocketgpt-compare finds by itself from here (creating none)
        found = tracking_uri(create=False)
    except TrackingError:
        found = None
    compare = ["pocketgpt-compare", experiment, "--sweep", parent.run_id[:8]]
    if parent.tracking_uri != found:
        compare += ["--tracking-uri", parent.tracking_uri]
    lines = [
        f"MLflow sweep: parent run {parent.run_id} ({run_name!r}) in experiment {experiment!r} "
        f"(id {parent.experiment_id}) at {parent.tracking_uri}, a child run per job",
        f"  compare its jobs: {shlex.join(compare)}",
    ]
    if experiment == TrackingConfig.experiment_name:
        lines.append(
            "  (beside single runs, as no experiment was named: tracking.experiment_name=NAME "
            "gives a sweep an experiment of its own)"
        )
    return "\n".join(lines)


def _close_quietly(parent: SweepParent) -> None:
    try:
        status = close_parent(parent)
    except Exception as e:
        print(f"warning: could not close the MLflow sweep run {parent.run_id}: {e}", flush=True)
        return
    if status:
        print(f"MLflow sweep: parent run {parent.run_id} {status}", flush=True)
