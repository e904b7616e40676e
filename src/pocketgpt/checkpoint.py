"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint is one file, ``ckpt-<step>.pt``, holding only tensors and plain Python values, so
it loads with ``torch.load(weights_only=True)``: no pickled objects on any load path. It holds
the model, optimizer and grad-scaler states, every RNG state, the loop's own state (step, data
position, early-stopping and metric-window counters) and metadata (config hash, MLflow run id).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketgpt.atomic import atomic_path, atomic_write_text
from pocketgpt.errors import CheckpointError

FORMAT = "pocketgpt-checkpoint"
VERSION = 1
PATTERN = re.compile(r"^ckpt-(\d{7})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}.pt"


def config_hash(resolved: dict) -> str:
    """Hash of the resolved config minus the keys that may change on resume."""
    cfg = json.loads(json.dumps(resolved, default=str))
    trainer = cfg.get("trainer", {})
    for key in ("resume", "max_time", "progress", "checkpoint_interval", "keep_checkpoints"):
        trainer.pop(key, None)
    cfg.pop("tracking", None)
    cfg.pop("cache_dir", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": _py_state_to_tensor(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_py_state_from_tensor(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )


def _py_state_to_tensor(state) -> dict:
    version, internal, gauss = state
    return {
        "version": version,
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss": gauss,
    }


def _py_state_from_tensor(d) -> tuple:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


# --------------------------------------------------------------------------- save / load


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write payload atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    with atomic_path(path, sync_dir=True) as tmp:  # sync_dir: the rename itself is durable
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    return path


REQUIRED = ("model", "optimizer", "scaler", "rng", "loop", "meta")


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a pocketgpt checkpoint ({reason[:200]})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pocketgpt checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {data.get('version')}, this pocketgpt reads "
            f"version {VERSION}"
        )
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)})")
    return data


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in directory, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.match(p.name))


def prune(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
    old = list_checkpoints(directory)[:-keep] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def find_resume_checkpoint(resume: str, search_roots: list[Path], cfg_hash: str) -> Path | None:
    """Resolve trainer.resume to a checkpoint file.

    - ``auto``: the newest checkpoint of an unfinished run with the same config hash under
      search_roots (Hydra's outputs/ and multirun/ folders), or None to start fresh;
    - a checkpoint file, or a folder of them (its newest).
    """
    if resume == "auto":
        candidates = []
        for root in search_roots:
            if root.is_dir():
                found = [*root.glob("ckpt-*.pt"), *root.glob("**/checkpoints/ckpt-*.pt")]
                candidates += [p for p in found if PATTERN.match(p.name)]
        for p in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
            meta_file = p.parent / "meta.json"
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if meta.get("config_hash") == cfg_hash and not meta.get("finished", False):
                return list_checkpoints(p.parent)[-1]
        return None
    path = Path(resume)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(
                f"trainer.resume={resume}: no ckpt-*.pt checkpoint in that folder"
            )
        return found[-1]
    if path.is_file():
        return path
    raise CheckpointError(
        f"trainer.resume={resume} is not 'auto', a checkpoint file or folder, or an MLflow run id"
    )


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """meta.json beside the checkpoints: what resume=auto reads to match a run."""
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2))
