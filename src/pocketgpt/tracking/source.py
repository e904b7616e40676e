"""What a model came from, and what the export and evaluate commands add to that run.

``source_of(uri)`` finds the MLflow run (and logged model) behind a model URI; the exports are
logged into that run as artifacts, and evaluation metrics as the run's metrics linked to the
logged model (MLflow 3 shows them on the model's page too).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from pocketgpt.errors import ModelURIError
from pocketgpt.tracking.registry import best_model_uri, store_uri
from pocketgpt.tracking.store import make_client

_LOGGED_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")


class Source(NamedTuple):
    run_id: str
    model_id: str | None  # the logged model, where the URI names one
    store: str  # the tracking URI both live in


def source_of(
    uri: str, tracking_uri: str | None = None, metric: str = "val_bpb", mode: str = "min"
) -> Source | None:
    """runs:/, models:/, m-ID or best: URI -> its run and logged model; None for a folder."""
    uri = uri.strip()
    if uri.startswith("best:"):
        uri = best_model_uri(uri[len("best:") :], metric, mode, tracking_uri)[0]
    elif _LOGGED_MODEL_ID.fullmatch(uri):
        uri = f"models:/{uri}"
    if not uri.startswith(("runs:/", "models:/")):
        return None
    store = store_uri(tracking_uri)
    client = make_client(store)
    from mlflow.exceptions import MlflowException

    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/") :].strip("/").partition("/")
            run = client.get_run(run_id)
            outputs = run.outputs.model_outputs if run.outputs else []
            names = {client.get_logged_model(o.model_id).name: o.model_id for o in outputs}
            return Source(run_id, names.get(path.split("/")[0]), store)
        rest = uri[len("models:/") :].strip("/")
        if _LOGGED_MODEL_ID.fullmatch(rest):
            model_id = rest
        else:
            if "@" in rest:
                name, alias = rest.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = rest.rsplit("/", 1)
                if number == "latest":
                    versions = client.search_model_versions(f"name = '{name}'")
                    number = str(max(int(v.version) for v in versions))
                version = client.get_model_version(name, number)
            model_id = getattr(version, "model_id", None)
            if not model_id:
                return Source(version.run_id, None, store) if version.run_id else None
        logged = client.get_logged_model(model_id)
        return Source(logged.source_run_id, model_id, store) if logged.source_run_id else None
    except (MlflowException, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelURIError(f"cannot find the run behind {uri} in {store}: {first}") from None


def log_folder(source: Source, folder: str | Path, artifact_path: str) -> str:
    """Log ``folder``'s files under ``artifact_path`` of the source run -> their artifact URI."""
    client = make_client(source.store)
    client.log_artifacts(source.run_id, str(folder), artifact_path)
    return f"runs:/{source.run_id}/{artifact_path}"


def log_metrics(source: Source, metrics: dict[str, float], step: int = 0) -> None:
    """Log ``metrics`` into the source run, linked to its logged model where there is one."""
    import time

    from mlflow.entities import Metric

    client = make_client(source.store)
    now = int(time.time() * 1000)
    batch = [
        Metric(key, float(value), now, step, model_id=source.model_id)
        for key, value in metrics.items()
    ]
    client.log_batch(source.run_id, metrics=batch)
