"""A model folder on disk: GPTMini's weights (safetensors) and config (JSON), no pickle.

``save_model``/``load_model`` write and read ``model.safetensors`` + ``model_config.json``;
``model_files`` finds them, and the tokenizer, in a plain folder or in an MLflow model folder
(whose ``MLmodel`` names them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pocketgpt.atomic import atomic_path, atomic_write_text
from pocketgpt.config import ModelConfig
from pocketgpt.errors import ConfigError, ModelFileError
from pocketgpt.model import GPTMini

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"


def save_model(model: GPTMini, directory: str | os.PathLike) -> Path:
    """Write model.safetensors and model_config.json into directory (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage; safetensors refuses shared tensors, so a tied head is saved
    # once (as the embedding) and re-tied on load. An untied head is a weight of its own.
    tied = model.config.tie_embeddings
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    config = json.dumps({"architecture": "GPTMini", **model.config.to_dict()}, indent=2)
    atomic_write_text(directory / CONFIG_FILE, config + "\n")
    return directory


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a folder written by save_model (its weights file must exist too)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise ModelFileError(f"{p} is missing; expected a folder written by pocketgpt")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.pop("architecture", None) != "GPTMini":
        raise ModelFileError(f"{config_path} does not describe a GPTMini model")
    try:
        return ModelConfig(**raw)
    except (TypeError, ConfigError) as e:
        raise ModelFileError(f"{config_path} has unexpected or impossible fields ({e})") from None


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> GPTMini:
    """Rebuild a GPTMini from a folder written by save_model."""
    directory = Path(directory)
    cfg = read_model_config(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelFileError(f"{weights_path} is not a readable safetensors file ({e})") from None
    model = GPTMini(cfg)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("tok_emb.weight")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelFileError(f"{weights_path} does not match {config_path}: {first}") from None
    return model.to(device)


def mlmodel_artifacts(mlmodel: Path) -> dict[str, str] | None:
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
        arts = mlmodel_artifacts(mlmodel)
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
