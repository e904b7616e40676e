"""Model URIs and the model registry: any URI to a local model folder, and registering models.

URI forms (the store: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``./mlruns``):

    runs:/RUN_ID/model         the model logged by a training run
    models:/NAME/VERSION       a registered version
    models:/NAME@ALIAS         a registered alias, e.g. models:/pocketgpt@best
    models:/m-ID  or  m-ID     a logged model id (as the MLflow UI shows it)
    best:EXPERIMENT            the finished run of EXPERIMENT with the lowest ``metric``
                               (``mode="max"``: highest) that logged a model
    a local folder             an MLflow model folder (with MLmodel), or one holding
                               model.safetensors, model_config.json and tokenizer.json

A SQLite store is read directly (``tracking.sqlite_lookup``), and a model whose files lie on this
disk is read in place: neither imports MLflow, which alone costs seconds at every start. Other
stores, and anything the direct read does not find, go through MLflow's client; from a remote
artifact store only MLmodel and the files it names are downloaded. MLmodel is read as YAML data.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from pocketgpt.errors import ModelURIError
from pocketgpt.tracking import sqlite_lookup
from pocketgpt.tracking.store import (
    check_reachable,
    make_client,
    registry_uri,
    sqlite_path,
    tracking_uri,
)

_LOGGED_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")


def store_uri(uri: str | None = None) -> str:
    """The store a model URI is looked up in; it must exist (a server must answer)."""
    resolved = tracking_uri(uri, create=False, error=ModelURIError)
    check_reachable(
        resolved,
        error=ModelURIError,
        hint="start it, or pass tracking_uri= (or set MLFLOW_TRACKING_URI) to a running store",
    )
    return resolved


def best_model_uri(
    experiment: str, metric: str = "val_bpb", mode: str = "min", tracking_uri: str | None = None
) -> tuple[str, str, float]:
    """-> (``models:/m-ID``, run id, metric value) of the best finished run that logged a model."""
    if mode not in ("min", "max"):
        raise ModelURIError(f"mode={mode!r} must be 'min' (lower is better) or 'max'")
    uri = store_uri(tracking_uri)
    db = sqlite_path(uri)
    found = sqlite_lookup.best_run(db, experiment, metric, mode) if db is not None else None
    if found is not None:
        model_id, run_id, value = found
        return f"models:/{model_id}", run_id, value
    client = make_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ModelURIError(
            f"experiment {experiment!r} not found in {uri}; experiments there: "
            f"{', '.join(names) or '(none)'}"
        )
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=[f"metrics.`{metric}` {'ASC' if mode == 'min' else 'DESC'}"],
        max_results=1000,
    )
    for run in runs:
        value = run.data.metrics.get(metric)
        outputs = run.outputs.model_outputs if run.outputs else []
        if value is None or math.isnan(value) or not outputs:
            continue
        return f"models:/{outputs[-1].model_id}", run.info.run_id, value
    raise ModelURIError(
        f"no finished run of experiment {experiment!r} has both metric {metric!r} and a logged "
        f"model in {uri}; train one with tracking.log_model=true, or pick another metric="
    )


def resolve(
    uri: str,
    dst: str | os.PathLike,
    tracking_uri: str | None = None,
    metric: str = "val_bpb",
    mode: str = "min",
) -> Path:
    """Any supported URI -> a local folder: the model's own folder when it lies on this disk,
    else downloaded into ``dst``."""
    if not isinstance(uri, str) or not uri.strip():
        raise ModelURIError(f"model URI {uri!r} is empty; give runs:/..., models:/... or a folder")
    uri = uri.strip()
    if uri.startswith("best:"):
        experiment = uri[len("best:") :]
        if not experiment:
            raise ModelURIError("best: needs an experiment name, e.g. best:pocketgpt")
        uri = best_model_uri(experiment, metric, mode, tracking_uri)[0]
    elif _LOGGED_MODEL_ID.fullmatch(uri):
        uri = f"models:/{uri}"
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/", uri)
    if scheme is None or len(scheme.group(1)) == 1:  # a path (a Windows drive is not a scheme)
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise ModelURIError(
                f"{uri!r} is neither a folder nor a model URI (runs:/RUN_ID/model, "
                "models:/NAME/VERSION, models:/NAME@ALIAS, models:/m-ID, best:EXPERIMENT)"
            )
        return path
    if scheme.group(1) not in ("runs", "models"):
        raise ModelURIError(
            f"{uri!r}: unsupported scheme {scheme.group(1)!r}; use runs:/, models:/, best: or "
            "a local folder"
        )
    _check_shape(uri)
    store = store_uri(tracking_uri)
    location = _sqlite_location(store, uri)
    if location is None:
        with _mlflow_errors(uri, store):
            location = _artifact_location(make_client(store), uri)
    local = _local_folder(location)
    if local is not None:
        return local  # on this disk already: read in place, copy nothing
    return _download(uri, store, location, Path(dst))


def _download(uri: str, store: str, location: str, dst: Path) -> Path:
    """The model at artifact URI ``location`` -> ``dst``: MLmodel and the files it names only
    (not the bundled code or examples), or the whole folder when it has no MLmodel."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from pocketgpt.model_io import mlmodel_artifacts

    def fetch(path: str) -> Path:
        """location/path -> dst/path"""
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/{path}".rstrip("/"),
                dst_path=str(Path(dst, path).parent if path else dst),
                tracking_uri=store,
                registry_uri=registry_uri(store),
            )
        )

    with _mlflow_errors(uri, store):
        try:
            arts = mlmodel_artifacts(fetch("MLmodel"))
        except MlflowException:
            return fetch("")  # no MLmodel there: a plain folder, taken whole
        if arts is None:
            return fetch("")
        for rel in arts.values():
            fetch(rel)
        return dst


@contextmanager
def _mlflow_errors(uri: str, store: str) -> Iterator[None]:
    """An MlflowException -> a one-line ModelURIError naming the URI and the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        first = (str(e.message).strip().splitlines() or [type(e).__name__])[0]
        raise ModelURIError(f"cannot load {uri!r} from {store}: {first}") from None


def _local_folder(location: str) -> Path | None:
    """An artifact URI that is a folder on this disk (file:///..., or a plain path) -> its path."""
    parsed = urlparse(location)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        path = Path(unquote(parsed.path))
    elif not parsed.scheme or len(parsed.scheme) == 1:  # a plain path (or a Windows drive)
        path = Path(location)
    else:
        return None
    return path if path.is_dir() else None


def _sqlite_location(store: str, uri: str) -> str | None:
    """runs:/ or models:/ URI -> its artifact URI read straight from a SQLite store, else None
    (another kind of store, or not found there: MLflow's client then answers, or explains)."""
    db, reg = sqlite_path(store), sqlite_path(registry_uri(store))
    if uri.startswith("runs:/"):
        run_id, path = uri[len("runs:/") :].strip("/").split("/", 1)
        return sqlite_lookup.run_model_location(db, run_id, path) if db else None
    rest = uri[len("models:/") :].strip("/")
    if _LOGGED_MODEL_ID.fullmatch(rest):
        return sqlite_lookup.logged_model_location(db, rest) if db else None
    if reg is None:
        return None
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = sqlite_lookup.alias_version(reg, name, alias)
    else:
        name, version = rest.rsplit("/", 1)
    location = sqlite_lookup.model_version_location(reg, name, version) if version else None
    # A version registered from a logged model may name it (models:/m-ID) rather than its files.
    linked = location[len("models:/") :] if location and location.startswith("models:/") else ""
    if _LOGGED_MODEL_ID.fullmatch(linked):
        return sqlite_lookup.logged_model_location(db, linked) if db else None
    return location


def _artifact_location(client, uri: str) -> str:
    """runs:/ or models:/ URI -> the artifact URI of its files, looked up in ``client``'s store.

    Done here rather than by MLflow's models:/ resolver, which asks the process-global tracking
    URI instead of the store it is given.
    """
    from mlflow.exceptions import MlflowException

    if uri.startswith("runs:/"):
        run_id, path = uri[len("runs:/") :].strip("/").split("/", 1)
        run = client.get_run(run_id)
        name, _, sub = path.partition("/")
        for output in run.outputs.model_outputs if run.outputs else []:
            logged = client.get_logged_model(output.model_id)
            if logged.name == name:
                return logged.artifact_location.rstrip("/") + (f"/{sub}" if sub else "")
        return f"{run.info.artifact_uri.rstrip('/')}/{path}"  # a plain run artifact folder
    rest = uri[len("models:/") :].strip("/")
    if _LOGGED_MODEL_ID.fullmatch(rest):
        return client.get_logged_model(rest).artifact_location
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, version = rest.rsplit("/", 1)
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise MlflowException(f"registered model {name!r} has no versions")
            version = str(max(int(v.version) for v in versions))
    return client.get_model_version_download_uri(name, version)


def _check_shape(uri: str) -> None:
    if uri.startswith("runs:/"):
        parts = uri[len("runs:/") :].strip("/").split("/", 1)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ModelURIError(f"{uri!r} needs a run id and a path: runs:/RUN_ID/model")
    else:
        rest = uri[len("models:/") :].strip("/")
        if not rest or ("@" not in rest and "/" not in rest and not rest.startswith("m-")):
            raise ModelURIError(
                f"{uri!r} needs a version or alias: models:/NAME/VERSION, models:/NAME@ALIAS "
                "or models:/m-ID"
            )


def split_register_as(spec: str) -> tuple[str, str | None]:
    """'NAME' or 'NAME@ALIAS' -> (NAME, ALIAS or None)."""
    name, _, alias = spec.partition("@")
    return name.strip(), (alias.strip() or None)


def register(client, model_id: str, run_id: str | None, spec: str):
    """Register logged model ``model_id`` as a new version of NAME (created if needed); set @ALIAS."""
    from mlflow.exceptions import MlflowException

    name, alias = split_register_as(spec)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # Source models:/m-ID links the version to the logged model (as mlflow's own log_model does);
    # a SQL registry resolves it through the process-global tracking URI, so point that at this
    # client's store for the call.
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
        )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version
