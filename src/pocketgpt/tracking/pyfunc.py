"""The logged model: an MLflow Model whose pyfunc flavour is built from code, never unpickled.

Every training run (``tracking.log_model=true``) logs one named ``model``: an MLflow 3
LoggedModel linked to the run, carrying the run's params and final metrics, so
``runs:/RUN_ID/model`` and ``models:/m-ID`` both reach it. Its folder:

    MLmodel                        pyfunc flavour, signature (prompt -> text, sampling params)
    pyfunc_entry.py                models-from-code: MLflow runs it instead of unpickling
    artifacts/model.safetensors    weights (safetensors: loading runs no code)
    artifacts/model_config.json    ModelConfig
    artifacts/tokenizer.json       tokenizer
    code/pocketgpt/                pocketgpt's source, so the model serves without it installed
    requirements.txt, python_env.yaml, input_example.json, serving_input_example.json

``tracking.register_as=NAME`` (or ``NAME@ALIAS``) also registers it as a new version of NAME.
Use it through ``pocketgpt.load(uri)``, ``mlflow.pyfunc.load_model(uri).predict(prompts,
params={...})`` or ``mlflow models serve -m URI --env-manager local``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shutil
import tempfile
import threading
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from pocketgpt import __version__
from pocketgpt.config import EngineConfig, GenerateConfig, SamplingConfig
from pocketgpt.errors import SamplingError
from pocketgpt.model import GPTMini
from pocketgpt.model_io import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, save_model
from pocketgpt.sampling import generate_text
from pocketgpt.tracking.registry import register, split_register_as

LOGGED_MODEL_NAME = "model"
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
_MLFLOW_TYPES = {int: "long", float: "double", bool: "boolean"}


# The engine settings a request may choose (threads is the process's: model_config at load).
ENGINE_PARAMS = ("engine", "quantize", "kernels", "quantize_head")


def _mlflow_type(hint) -> str:
    base = next(t for t in typing.get_args(hint) or (hint,) if t is not None)
    return "string" if issubclass(base, enum.Enum) else _MLFLOW_TYPES[base]


def param_types() -> dict[str, str]:
    """Every param a caller may pass, with its MLflow type: the SamplingConfig fields and the
    engine's (ENGINE_PARAMS)."""
    hints = typing.get_type_hints(GenerateConfig)
    names = [f.name for f in dataclasses.fields(SamplingConfig)] + list(ENGINE_PARAMS)
    return {name: _mlflow_type(hints[name]) for name in names}


def param_defaults() -> dict[str, Any]:
    """Each param's default: the generate command's (GenerateConfig), e.g. engine=auto."""
    defaults = {f.name: f.default for f in dataclasses.fields(GenerateConfig)}
    return {k: getattr(defaults[k], "value", defaults[k]) for k in param_types()}


def settings_from_params(
    params: dict[str, Any] | None, threads: int | None = None
) -> tuple[SamplingConfig, EngineConfig]:
    """pyfunc params -> a checked SamplingConfig and EngineConfig; an unknown name is an error."""
    types = param_types()
    params = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(params) - set(types))
    if unknown:
        raise SamplingError(
            f"unknown sampling param {unknown[0]!r}; expected some of {', '.join(types)}"
        )
    cast = {"long": int, "double": float, "boolean": bool, "string": str}
    try:
        values = {k: cast[types[k]](v) for k, v in params.items()}
    except (TypeError, ValueError):
        raise SamplingError(
            f"sampling params {params} must be numbers (and bools for stop_at_eos, use_cache)"
        ) from None
    engine = {k: values.pop(k) for k in ENGINE_PARAMS if k in values}
    engine = {**{k: param_defaults()[k] for k in ENGINE_PARAMS}, **engine}
    return SamplingConfig(**values), EngineConfig(**engine, threads=threads)  # check themselves


def _prompts(model_input: Any) -> list[str]:
    """A DataFrame (a ``prompt`` column, or a single column), a list or array of strings, a
    string, or {"prompt": ...} -> a list of prompts."""
    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            model_input = model_input["prompt"]
        elif model_input.shape[1] == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise SamplingError(
                f"input has columns {list(model_input.columns)}; give one column named 'prompt'"
            )
    if isinstance(model_input, dict):
        model_input = model_input.get("prompt", model_input.get("prompts"))
    if isinstance(model_input, str):
        model_input = [model_input]
    prompts = []
    for item in [] if model_input is None else model_input:
        # {"inputs": {"prompt": [...]}} arrives as one row holding the whole list
        is_seq = not isinstance(item, str) and hasattr(item, "__iter__")
        prompts.extend(list(item) if is_seq else [item])
    bad = next((p for p in prompts if not isinstance(p, str)), None)
    if not prompts or bad is not None:
        raise SamplingError(
            f"expected prompts as strings, got {bad!r}" if prompts else "no prompts given"
        )
    return prompts


class PocketGPTModel(mlflow.pyfunc.PythonModel):
    """pyfunc: prompts -> generated continuations (the text after each prompt, up to <eos>).

    Input: a list of strings, or a one-column DataFrame of them (MLflow's schema enforcement
    turns both into a DataFrame). Params: every SamplingConfig field, and the engine's
    (``engine`` auto|native|torch, ``quantize``, ``kernels``, ``quantize_head``; default auto:
    the native C++ engine where it can run the model). ``model_config`` at load: ``device``
    (default cpu) and ``threads`` (torch's and the native engine's; default unchanged / 1).
    """

    def load_context(self, context) -> None:
        import torch

        from pocketgpt.loading import load_files
        from pocketgpt.runtime import resolve_device

        config = context.model_config or {}
        self.device = str(resolve_device(str(config.get("device", "cpu")), "model_config.device"))
        self.threads = int(config["threads"]) if config.get("threads") else 1
        if config.get("threads"):
            torch.set_num_threads(self.threads)
        self.model_dir = Path(context.artifacts["weights"]).parent
        self.model, self.tokenizer = load_files(
            self.model_dir, context.artifacts["tokenizer"], self.device
        )
        self._engines: dict[tuple, Any] = {}  # engine settings -> NativeGPT, or None for torch
        self._engines_lock = threading.Lock()

    def _model_for(self, cfg: EngineConfig):
        """The model a request's engine settings ask for, each engine built once and kept."""
        from pocketgpt.native import open_engine

        key = (cfg.engine, cfg.quantize, cfg.kernels, cfg.quantize_head)
        with self._engines_lock:  # serving threads: build each engine once
            if key not in self._engines:
                self._engines[key] = open_engine(self.model_dir, self.device, cfg)
        return self._engines[key] or self.model

    # The DataFrame hint tells MLflow to use signature() as given: a list[str] hint would make it
    # infer a signature from the hint and drop the params schema.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        sampling, engine = settings_from_params(params, self.threads)
        model = self._model_for(engine)
        return generate_text(model, self.tokenizer, _prompts(model_input), sampling)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    defaults = param_defaults()
    return ModelSignature(
        # One unnamed string column: accepts {"inputs": [...]} and dataframe_records alike.
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(k, t, defaults[k]) for k, t in param_types().items()]),
    )


def pip_requirements() -> list[str]:
    """Pins of what the pyfunc imports, from this environment (pocketgpt itself ships as code)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("mlflow", "torch", "safetensors", "tokenizers", "regex", "numpy", "pandas"):
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")  # drop local tags like +cpu
        except PackageNotFoundError:
            pins.append(name)
    return pins


def _stage_code(dst: Path) -> Path:
    """Copy pocketgpt's Python source (not the embedded corpus) to dst/pocketgpt."""
    src = Path(__file__).resolve().parents[1]  # the pocketgpt package
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "corpus", "conf", "*.egg-info")
    return Path(shutil.copytree(src, dst / "pocketgpt", ignore=ignore))


def save_pyfunc(
    path: str | os.PathLike, model: GPTMini, tokenizer_path: str | os.PathLike, mlflow_model=None
) -> Path:
    """Write the MLflow model folder described in the module doc at ``path`` (must not exist)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="pocketgpt-pyfunc-") as tmp:
        files = save_model(model, Path(tmp) / "files")
        shutil.copyfile(tokenizer_path, files / TOKENIZER_FILE)
        code = _stage_code(Path(tmp) / "code")
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(ENTRY_FILE),  # models-from-code: no pickle
            artifacts={
                "weights": str(files / WEIGHTS_FILE),
                "config": str(files / CONFIG_FILE),
                "tokenizer": str(files / TOKENIZER_FILE),
            },
            code_paths=[str(code)],
            signature=signature(),
            input_example=(
                pd.DataFrame({"prompt": ["The meaning of life is"]}),
                {"max_new_tokens": 20},
            ),
            pip_requirements=pip_requirements(),
            mlflow_model=mlflow_model,
            metadata={"pocketgpt_version": __version__, **model.config.to_dict()},
        )
    return path


@dataclass
class LoggedModelInfo:
    model_id: str
    model_uri: str  # models:/m-ID
    run_uri: str  # runs:/RUN_ID/model
    registered_name: str | None = None
    registered_version: str | None = None
    alias: str | None = None

    def describe(self) -> str:
        text = f"{self.model_uri} ({self.run_uri})"
        if self.registered_name:
            text += f", registered as models:/{self.registered_name}/{self.registered_version}"
            if self.alias:
                text += f" and models:/{self.registered_name}@{self.alias}"
        return text


def _link_metrics(client, run_id: str, model_id: str) -> None:
    """Attach each metric's latest value to the model, so the UI shows them on it."""
    from mlflow.entities import Metric

    linked = []
    for key in client.get_run(run_id).data.metrics:
        last = max(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        linked.append(
            Metric(key, last.value, last.timestamp, last.step, run_id=run_id, model_id=model_id)
        )
    for i in range(0, len(linked), 1000):
        client.log_batch(run_id, metrics=linked[i : i + 1000])


def log_model(
    client,
    run_id: str,
    model: GPTMini,
    tokenizer_path: str | os.PathLike,
    step: int = 0,
    register_as: str | None = None,
) -> LoggedModelInfo:
    """Log the model of run ``run_id`` (an MlflowClient's store) as a LoggedModel, and register it.

    The model is READY only once all its files are uploaded (FAILED if anything fails), so a
    reader never takes a half-written model.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=LOGGED_MODEL_NAME,
        source_run_id=run_id,
        params=dict(run.data.params),
        tags={"pocketgpt.version": __version__},
        model_type="pocketgpt.GPTMini",
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
        mlflow_model = Model(
            artifact_path=logged.artifact_location,
            model_uuid=logged.model_id,
            run_id=run_id,
            model_id=logged.model_id,
        )
        with tempfile.TemporaryDirectory(prefix="pocketgpt-log-") as tmp:
            local = save_pyfunc(Path(tmp) / "model", model, tokenizer_path, mlflow_model)
            client.log_model_artifacts(logged.model_id, str(local))
        _link_metrics(client, run_id, logged.model_id)
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    info = LoggedModelInfo(
        logged.model_id, f"models:/{logged.model_id}", f"runs:/{run_id}/{LOGGED_MODEL_NAME}"
    )
    if register_as:
        version = register(client, logged.model_id, run_id, register_as)
        info.registered_name, info.alias = split_register_as(register_as)
        info.registered_version = str(version.version)
    return info
