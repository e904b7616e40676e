"""Where runs are recorded: the one place that resolves a tracking store and makes its client.

Every command reads and writes the same store: ``tracking.uri`` (or a command's
``tracking_uri``), else ``$MLFLOW_TRACKING_URI``, else SQLite at ``./mlruns/mlflow.db`` with its
artifacts beside it in ``./mlruns/artifacts``. Training creates that default store; readers
(loading a model, compare) require it to exist. A tracking server (``http(s)://``) must answer
at once: ``check_reachable`` fails fast where MLflow itself would retry for minutes.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from pocketgpt.errors import PocketGPTError, TrackingError

DEFAULT_STORE_DIR = "mlruns"


def tracking_uri(
    uri: str | None = None,
    *,
    create: bool = True,
    error: type[PocketGPTError] = TrackingError,
    hint: str = "pass the store's URI (e.g. sqlite:///path/mlflow.db) or set MLFLOW_TRACKING_URI",
) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlruns/mlflow.db``.

    ``create``: make the default store's folder (training). Otherwise a SQLite store that does
    not exist raises ``error`` naming it and ``hint``: a reader would only find it empty.
    """
    resolved = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not resolved:
        store = Path.cwd() / DEFAULT_STORE_DIR
        if create:
            store.mkdir(parents=True, exist_ok=True)
        resolved = f"sqlite:///{store / 'mlflow.db'}"
    db = sqlite_path(resolved)
    if not create and db is not None and not db.is_file():
        raise error(f"no MLflow store at {db}; {hint}")
    return resolved


def check_reachable(
    uri: str,
    *,
    error: type[PocketGPTError] = TrackingError,
    hint: str = "start it, or pass the URI of a store that is running",
    timeout: float = 5.0,
) -> None:
    """Raise ``error`` naming ``uri`` when the tracking server there does not answer ``/health``.

    Only for ``http(s)://`` URIs (a file or database store has no server); MLflow's own client
    would retry a refused connection for minutes before giving up.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except requests.RequestException as e:
        raise error(
            f"the MLflow tracking server at {uri} does not answer ({type(e).__name__}); {hint}"
        ) from None
    _check_login(uri, error, timeout)


def _check_login(uri: str, error: type[PocketGPTError], timeout: float) -> None:
    """A server with authentication (``mlflow server --app-name basic-auth``) answers /health
    to anyone; one API call with this process's credentials tells whether they are accepted."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/get-by-name",
            "GET",
            max_retries=0,
            timeout=timeout,
            raise_on_status=False,
            params={"experiment_name": "Default"},
        )
    except MlflowException:
        return  # not an auth answer; the first real call reports whatever this is
    if response.status_code in (401, 403):
        given = "were refused" if _has_credentials() else "were not given"
        raise error(
            f"the MLflow tracking server at {uri} requires a login (HTTP "
            f"{response.status_code}) and credentials {given}; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for a user of that server"
        )


def _has_credentials() -> bool:
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
    return any(os.environ.get(n) for n in names)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def registry_uri(uri: str) -> str:
    """The model registry: $MLFLOW_REGISTRY_URI, else the tracking store itself."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or uri


def artifact_location(uri: str) -> str | None:
    """A new experiment's artifact root: beside a SQLite store's database, not in the cwd."""
    db = sqlite_path(uri)
    return (db.resolve().parent / "artifacts").as_uri() if db is not None else None


def _is_locked(e: BaseException) -> bool:
    text = str(e).lower()
    return "database is locked" in text or "database table is locked" in text


class RetryingClient:
    """An ``MlflowClient`` whose calls retry with jittered backoff while SQLite is locked.

    Parallel sweep jobs (hydra/launcher=joblib) write to one SQLite file; SQLite answers
    "database is locked" at once, without waiting, when two writers would deadlock. Every call
    runs in one transaction that is rolled back on that error, so a retry is safe.
    """

    def __init__(self, client: Any, retries: int = 8, base_delay: float = 0.05):
        self._client = client
        self._retries = retries
        self._base_delay = base_delay

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(self._retries + 1):
                try:
                    return attr(*args, **kwargs)
                except Exception as e:
                    if attempt == self._retries or not _is_locked(e):
                        raise
                    time.sleep(self._base_delay * 2**attempt * (1.0 + random.random()))
            raise AssertionError("unreachable")

        return call


def make_client(uri: str) -> Any:
    """An MlflowClient for store ``uri`` (and its registry) that rides out SQLite locks."""
    from mlflow.tracking import MlflowClient

    return RetryingClient(MlflowClient(tracking_uri=uri, registry_uri=registry_uri(uri)))
