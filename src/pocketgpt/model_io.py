"""Saving and loading GPTMini weights: safetensors plus a JSON model config, no pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pocketgpt.atomic import atomic_path, atomic_write_text
from pocketgpt.model import GPTConfig, GPTMini

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


class ModelFileError(ValueError):
    """A model folder that is missing, truncated or not a GPTMini; names the file and the fix."""


def save_model(model: GPTMini, directory: str | os.PathLike) -> Path:
    """Write model.safetensors and model_config.json into directory (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage; safetensors refuses shared tensors, so save the head once
    # (as the embedding) and re-tie on load.
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    config = json.dumps({"architecture": "GPTMini", **model.config.to_dict()}, indent=2)
    atomic_write_text(directory / CONFIG_FILE, config + "\n")
    return directory


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> GPTMini:
    """Rebuild a GPTMini from a folder written by save_model."""
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
        cfg = GPTConfig(**raw)
    except TypeError as e:
        raise ModelFileError(f"{config_path} has unexpected fields ({e})") from None
    try:
        state = load_file(str(weights_path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelFileError(f"{weights_path} is not a readable safetensors file ({e})") from None
    model = GPTMini(cfg)
    state["lm_head.weight"] = state.get("tok_emb.weight")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelFileError(f"{weights_path} does not match {config_path}: {first}") from None
    return model.to(device)
