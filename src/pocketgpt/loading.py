"""Load a trained model and its tokenizer from anywhere MLflow or a disk keeps it.

    >>> model, tokenizer = pocketgpt.load("models:/pocketgpt@best")  # doctest: +SKIP

URI forms (``tracking_uri``: the argument, else ``$MLFLOW_TRACKING_URI``, else ``./mlruns``):

    runs:/RUN_ID/model         the model logged by a training run
    models:/NAME/VERSION       a registered version
    models:/NAME@ALIAS         a registered alias, e.g. models:/pocketgpt@best
    models:/m-ID  or  m-ID     a logged model id (as the MLflow UI shows it)
    best:EXPERIMENT            the finished run of EXPERIMENT with the lowest ``metric``
                               (``mode="max"``: highest) that logged a model
    a local folder             an MLflow model folder (with MLmodel), or one holding
                               model.safetensors, model_config.json and tokenizer.json

Nothing is unpickled: weights load from safetensors, the config and tokenizer from JSON, and an
MLmodel file is read as YAML data.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from pocketgpt.model import GPTMini
from pocketgpt.model_io import CONFIG_FILE, WEIGHTS_FILE, ModelFileError, load_model

TOKENIZER_FILE = "tokenizer.json"
_LOGGED_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")


class ModelURIError(ValueError):
    """A model URI that does not resolve; the message names the URI and the fix."""


class Loaded(NamedTuple):
    model: GPTMini
    tokenizer: object  # a pocketgpt.tokenizer.Tokenizer


def default_tracking_uri(tracking_uri: str | None = None) -> str:
    """The argument, else $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db (which must exist)."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from pocketgpt.tracking import DEFAULT_STORE_DIR

    db = Path.cwd() / DEFAULT_STORE_DIR / "mlflow.db"
    if not db.is_file():
        raise ModelURIError(
            f"no MLflow store at {db}; pass tracking_uri=... (e.g. sqlite:///path/mlflow.db) or "
            "set MLFLOW_TRACKING_URI"
        )
    return f"sqlite:///{db}"


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=_registry_uri(tracking_uri))


def _registry_uri(tracking_uri: str) -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri


def best_model_uri(
    experiment: str, metric: str = "val_bpb", mode: str = "min", tracking_uri: str | None = None
) -> tuple[str, str, float]:
    """-> (``models:/m-ID``, run id, metric value) of the best finished run that logged a model."""
    if mode not in ("min", "max"):
        raise ModelURIError(f"mode={mode!r} must be 'min' (lower is better) or 'max'")
    uri = default_tracking_uri(tracking_uri)
    client = _client(uri)
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
    """Any supported URI -> a local folder (downloaded into ``dst`` unless it is local)."""
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
    store = default_tracking_uri(tracking_uri)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    def fetch(location: str, path: str) -> Path:
        """location/path -> dst/path"""
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.rstrip('/')}/{path}".rstrip("/"),
                dst_path=str(Path(dst, path).parent if path else dst),
                tracking_uri=store,
                registry_uri=_registry_uri(store),
            )
        )

    try:
        with quiet_artifact_progress():
            location = _artifact_location(_client(store), uri)
            # Only MLmodel and the files it names: not the bundled code or examples.
            try:
                arts = _mlmodel_artifacts(fetch(location, "MLmodel"))
            except MlflowException:
                return fetch(location, "")  # no MLmodel there: a plain folder, taken whole
            if arts is None:
                return fetch(location, "")
            for rel in arts.values():
                fetch(location, rel)
            return Path(dst)
    except MlflowException as e:
        first = (str(e.message).strip().splitlines() or [type(e).__name__])[0]
        raise ModelURIError(f"cannot load {uri!r} from {store}: {first}") from None


@contextmanager
def quiet_artifact_progress():
    """Silence MLflow's artifact progress bars (one per file copied) for the duration."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


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


def _mlmodel_artifacts(mlmodel: Path) -> dict[str, str] | None:
    """MLmodel (read as YAML data) -> {weights|config|tokenizer: path in the model folder}."""
    import yaml

    try:
        arts = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]["artifacts"]
        paths = {k: str(arts[k]["path"]) for k in ("weights", "config", "tokenizer")}
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
        return None
    for p in paths.values():
        if Path(p).is_absolute() or ".." in Path(p).parts:
            raise ModelFileError(f"{mlmodel} names {p!r}, outside the model folder; refusing it")
    return paths


def model_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """-> (folder with model.safetensors + model_config.json, tokenizer file) of a model folder.

    An MLflow model folder names its files in MLmodel (python_function.artifacts); a plain one
    holds the three files itself.
    """
    folder = Path(folder)
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        arts = _mlmodel_artifacts(mlmodel)
        if arts is None:
            raise ModelFileError(
                f"{mlmodel} is not a pocketgpt model (its python_function flavour names no "
                "weights, config and tokenizer artifacts); was it logged by pocketgpt?"
            )
        paths = {k: folder / rel for k, rel in arts.items()}
        if paths["weights"].parent != paths["config"].parent:
            raise ModelFileError(f"{mlmodel}: weights and config must sit in the same folder")
        for p in paths.values():
            if not p.is_file():
                raise ModelFileError(f"{p} is missing from the logged model; re-log the model")
        return paths["weights"].parent, paths["tokenizer"]
    if (folder / WEIGHTS_FILE).is_file() or (folder / CONFIG_FILE).is_file():
        tokenizer = folder / TOKENIZER_FILE
        if not tokenizer.is_file():
            raise ModelFileError(
                f"{tokenizer} is missing; put the run's tokenizer.json beside the weights"
            )
        return folder, tokenizer
    raise ModelFileError(
        f"{folder} holds no pocketgpt model (no MLmodel, no {WEIGHTS_FILE}); expected a logged "
        f"model folder or {WEIGHTS_FILE} + {CONFIG_FILE} + {TOKENIZER_FILE}"
    )


def check_device(device: str | torch.device) -> str:
    """'auto' -> the best available; an unknown or unavailable device -> ModelURIError."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ModelURIError(
            f"device={name!r} is not a torch device; use cpu, cuda or mps"
        ) from None
    available = {"cpu": True, "cuda": torch.cuda.is_available()}
    available["mps"] = torch.backends.mps.is_available()
    if not available.get(kind, False):
        raise ModelURIError(f"device={name!r} is not available here; use device=cpu (or auto)")
    return name


def load_files(
    model_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, device: str = "cpu"
) -> Loaded:
    """model.safetensors + model_config.json in model_dir, and a tokenizer file -> Loaded."""
    from pocketgpt.tokenizer import load_tokenizer

    model = load_model(model_dir, device).eval()
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ModelFileError(
            f"{tokenizer_path} has vocab_size {tokenizer.vocab_size} but the model has "
            f"{model.config.vocab_size}; use the tokenizer logged with this model"
        )
    return Loaded(model, tokenizer)


def load(
    uri: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    tracking_uri: str | None = None,
    metric: str = "val_bpb",
    mode: str = "min",
) -> Loaded:
    """Any supported URI (see the module doc) -> (model in eval mode on ``device``, tokenizer)."""
    device = check_device(device)
    with tempfile.TemporaryDirectory(prefix="pocketgpt-load-") as tmp:
        folder = resolve(os.fspath(uri), tmp, tracking_uri, metric, mode)
        model_dir, tokenizer_path = model_files(folder)
        return load_files(model_dir, tokenizer_path, device)
