"""Model URI lookups read straight from a SQLite MLflow store, without importing MLflow.

``import mlflow`` and opening its SQLAlchemy store (schema check included) cost seconds, while
finding where a registered model's files lie is one indexed query. This module answers those
queries read-only with the standard library's ``sqlite3``, from the tables MLflow 3 writes.

It only ever answers what it found: ``None`` means "ask MLflow" (not found, a table or column
this MLflow schema lacks, a database that is locked or newer than expected, a workspace set in
``$MLFLOW_WORKSPACE``), so a miss costs nothing but the MLflow path the registry took anyway,
and MLflow stays the one source of error messages.
"""

from __future__ import annotations

import math
import os
import sqlite3
from contextlib import closing
from pathlib import Path

# MLflow >= 3 scopes registered models and experiments by workspace; a store that never enabled
# workspaces keeps everything in this one.
_WORKSPACE = "default"


def _query(db: Path, sql: str, args: tuple) -> list[tuple] | None:
    """Rows of a read-only query, or None when the store cannot answer it here."""
    if os.environ.get("MLFLOW_WORKSPACE", "").strip():
        return None  # another workspace: MLflow knows how to scope it
    try:
        # mode=ro: a reader never creates, migrates or locks the store for writing.
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as c:
            return c.execute(sql, args).fetchall()
    except sqlite3.Error:
        return None


def _one(db: Path, sql: str, args: tuple) -> str | None:
    rows = _query(db, sql, args)
    return rows[0][0] if rows and rows[0][0] else None


def logged_model_location(db: Path, model_id: str) -> str | None:
    """m-ID -> the logged model's artifact location."""
    return _one(
        db,
        "SELECT artifact_location FROM logged_models "
        "WHERE model_id = ? AND lifecycle_stage != 'deleted'",
        (model_id,),
    )


def model_version_location(db: Path, name: str, version: str) -> str | None:
    """A registered version (a number, or 'latest' for the highest) -> where its files lie.

    As MLflow's ``get_model_version_download_uri``: the storage location, else the source.
    """
    live = "name = ? AND workspace = ? AND current_stage != 'Deleted_Internal'"
    if version == "latest":
        sql = f"SELECT version FROM model_versions WHERE {live} ORDER BY version DESC LIMIT 1"
        rows = _query(db, sql, (name, _WORKSPACE))
        if not rows:
            return None
        version = str(rows[0][0])
    if not version.isdigit():
        return None
    return _one(
        db,
        f"SELECT COALESCE(storage_location, source) FROM model_versions WHERE {live} "
        "AND version = ?",
        (name, _WORKSPACE, int(version)),
    )


def alias_version(db: Path, name: str, alias: str) -> str | None:
    """NAME@ALIAS -> the version number the alias points at."""
    rows = _query(
        db,
        "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ? "
        "AND workspace = ?",
        (name, alias, _WORKSPACE),
    )
    return str(rows[0][0]) if rows else None


def run_model_location(db: Path, run_id: str, path: str) -> str | None:
    """runs:/RUN_ID/PATH -> the files: the run's first logged model named PATH's first part
    (plus the rest of PATH), else the run's own artifact folder / PATH."""
    name, _, sub = path.partition("/")
    rows = _query(
        db,
        "SELECT m.artifact_location, m.lifecycle_stage FROM inputs i JOIN logged_models m "
        "ON m.model_id = i.destination_id WHERE i.source_type = 'RUN_OUTPUT' "
        "AND i.source_id = ? AND i.destination_type = 'MODEL_OUTPUT' AND m.name = ? "
        "ORDER BY i.rowid LIMIT 1",
        (run_id, name),
    )
    if rows is None:
        return None
    if rows:
        location, stage = rows[0]
        if stage == "deleted":
            return None  # MLflow refuses it, in its own words
        return location.rstrip("/") + (f"/{sub}" if sub else "")
    root = _one(db, "SELECT artifact_uri FROM runs WHERE run_uuid = ?", (run_id,))
    return f"{root.rstrip('/')}/{path}" if root else None


def best_run(db: Path, experiment: str, metric: str, mode: str) -> tuple[str, str, float] | None:
    """-> (model id, run id, metric value) of the finished, active run of ``experiment`` with the
    lowest (``mode="min"``) or highest latest value of ``metric`` that logged a model.

    Ties go as MLflow's ``search_runs`` orders them: the newest run first, then by run id.
    """
    order = "ASC" if mode == "min" else "DESC"
    rows = _query(
        db,
        "SELECT r.run_uuid, lm.value, "
        "(SELECT i.destination_id FROM inputs i WHERE i.source_type = 'RUN_OUTPUT' "
        " AND i.source_id = r.run_uuid AND i.destination_type = 'MODEL_OUTPUT' "
        " ORDER BY i.rowid DESC LIMIT 1) "
        "FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
        "JOIN latest_metrics lm ON lm.run_uuid = r.run_uuid AND lm.key = ? "
        "WHERE e.name = ? AND e.workspace = ? AND r.status = 'FINISHED' "
        "AND r.lifecycle_stage = 'active' AND lm.is_nan = 0 "
        f"ORDER BY lm.value {order}, r.start_time DESC, r.run_uuid ASC",
        (metric, experiment, _WORKSPACE),
    )
    for run_id, value, model_id in rows or []:
        if model_id and value is not None and not math.isnan(value):
            return model_id, run_id, float(value)
    return None
