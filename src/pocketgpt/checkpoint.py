"""Training checkpoints: everything needed to continue a run bit for bit, written atomically,
and every way of finding one to resume from.

A checkpoint is one file, ``ckpt-<step>.pt``, holding only tensors and plain Python values, so
it loads with ``torch.load(weights_only=True)``: no pickled objects on any load path. It holds
the model, optimizer and grad-scaler states, every RNG state, the loop's own state (step, data
position, early-stopping and metric-window counters) and metadata (config hash, MLflow run id).
``CheckpointWriter`` writes a run's checkpoints into one folder; ``resolve_resume`` turns
``trainer.resume`` (auto, a file or folder, an MLflow run id) into a loaded checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pocketgpt.atomic import atomic_path, atomic_write_text
from pocketgpt.errors import CheckpointError
from pocketgpt.tracking.run import CHECKPOINT_DIR_TAG

if TYPE_CHECKING:
    from pocketgpt.config import TrainerConfig

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


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """meta.json beside the checkpoints: what resume=auto reads to match a run."""
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2))


class CheckpointWriter:
    """Writes one run's checkpoints into ``directory``, keeping the newest ``keep``.

    ``meta()`` is read at each write (the MLflow run id is only known once the run has started)
    and stored in the checkpoint and in meta.json beside it.
    """

    def __init__(self, directory: Path, keep: int, meta: Callable[[], dict[str, Any]] = dict):
        self.directory = Path(directory)
        self.keep = keep
        self.meta = meta

    def write(self, step: int, state: dict[str, Any], finished: bool = False) -> Path:
        """Save ``state`` (model, optimizer, ... as the trainer gathers it) as step's checkpoint.

        meta.json (what resume=auto matches on) is written before the first checkpoint can
        appear, so a kill right after any checkpoint still finds it; "finished" only after the
        final one is safely on disk.
        """
        meta = {**self.meta(), "step": step, "finished": False}
        payload = {**state, "meta": {**meta, "finished": finished}}
        write_meta(self.directory, meta)
        path = save_checkpoint(self.directory / checkpoint_name(step), payload)
        if finished:
            write_meta(self.directory, {**meta, "finished": True})
        prune(self.directory, self.keep)
        return path


# --------------------------------------------------------------------------- resume


@dataclass
class Resume:
    """A checkpoint to continue from: where it is, and its loaded contents."""

    path: Path
    checkpoint: dict[str, Any]

    @property
    def run_id(self) -> str:
        """The MLflow run the checkpoint belongs to ("" if none)."""
        return self.checkpoint["meta"].get("mlflow_run_id", "")

    @property
    def directory(self) -> Path | None:
        """The run's own checkpoint folder, where the resumed run keeps writing (and where
        resume=auto looks next time); None for a copy downloaded from MLflow (no meta.json)."""
        return self.path.parent if (self.path.parent / "meta.json").exists() else None


def resolve_resume(
    cfg: TrainerConfig, cfg_hash: str, tracker: Any, job_dir: str | os.PathLike | None = None
) -> Resume | None:
    """trainer.resume -> the checkpoint to continue from, or None to start fresh.

    ``tracker`` (with ``client`` and ``uri``) finds the checkpoints of an MLflow run id;
    ``job_dir`` is this job's own output folder (Hydra's ``hydra.runtime.output_dir``), where
    resume=auto looks first. A checkpoint written by a different config (another
    ``config_hash``) is refused.
    """
    path = resume_path(cfg, cfg_hash, tracker, job_dir)
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    if ckpt["meta"].get("config_hash") != cfg_hash:
        raise CheckpointError(
            f"checkpoint {path} was written by a different config; resume with the "
            f"overrides it was trained with, or set trainer.resume=null to start fresh"
        )
    return Resume(path, ckpt)


def resume_path(
    cfg: TrainerConfig, cfg_hash: str, tracker: Any, job_dir: str | os.PathLike | None = None
) -> Path | None:
    """trainer.resume -> a checkpoint file, or None to start fresh (none set, or auto found no
    unfinished run of this config)."""
    resume = cfg.resume
    if not resume:
        return None
    if re.fullmatch(r"[0-9a-f]{32}", resume):  # an MLflow run id
        return checkpoint_of_run(tracker, resume)
    own = [Path(cfg.checkpoint_dir)] if cfg.checkpoint_dir else []
    if job_dir:
        own.append(Path(job_dir) / "checkpoints")
    roots = [*own, *hydra_roots(), Path("outputs"), Path("multirun")]
    return find_resume_checkpoint(resume, roots, cfg_hash, own=own)


def hydra_roots() -> list[Path]:
    """The folders Hydra puts this config's runs and sweeps in: the fixed leading part of
    ``hydra.run.dir`` and ``hydra.sweep.dir`` (``outputs`` of ``outputs/${now:...}/...``; the
    whole folder when it has no interpolation). A root that is the working folder or above
    it is left out (searching it would walk the whole tree); none outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    cwd = Path.cwd().resolve()
    roots = []
    for node in (hc.run, hc.sweep):
        try:
            pattern = str(OmegaConf.to_container(node, resolve=False)["dir"])
        except Exception:  # noqa: BLE001 - an odd hydra config only narrows the search
            continue
        fixed = []
        for part in Path(pattern).parts:
            if "${" in part:
                break
            fixed.append(part)
        if not fixed:
            continue
        root = Path(*fixed)
        if root.resolve() == cwd or root.resolve() in cwd.parents:
            continue
        roots.append(root)
    return roots


def find_resume_checkpoint(
    resume: str, search_roots: list[Path], cfg_hash: str, own: list[Path] = ()
) -> Path | None:
    """Resolve a trainer.resume path setting to a checkpoint file.

    - ``auto``: the newest checkpoint of an unfinished run with the same config hash: in
      ``own`` (this job's own checkpoint folders) first, else the newest under search_roots
      (Hydra's outputs/ and multirun/ folders ...), or None to start fresh;
    - a checkpoint file, or a folder of them (its newest).
    """
    if resume == "auto":
        for directory in own:
            if _unfinished_run_of(directory, cfg_hash):
                return list_checkpoints(directory)[-1]
        candidates, seen = [], set()
        for root in search_roots:
            if root.is_dir() and root.resolve() not in seen:
                seen.add(root.resolve())
                found = [*root.glob("ckpt-*.pt"), *root.glob("**/checkpoints/ckpt-*.pt")]
                candidates += [p for p in found if PATTERN.match(p.name)]
        for p in sorted(set(candidates), key=_mtime, reverse=True):
            if _unfinished_run_of(p.parent, cfg_hash):
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


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # pruned meanwhile
        return 0.0


def _unfinished_run_of(directory: Path, cfg_hash: str) -> bool:
    """Whether directory holds checkpoints of an unfinished run of this config (meta.json)."""
    if not list_checkpoints(directory):
        return False
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("config_hash") == cfg_hash and not meta.get("finished", False)


def checkpoint_of_run(tracker: Any, run_id: str) -> Path:
    """The newest checkpoint of an MLflow run: its local folder, else its artifacts (downloaded
    into a temporary folder)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        raise CheckpointError(
            f"trainer.resume={run_id}: no such run in {tracker.uri}; check the run id or "
            f"tracking.uri"
        ) from None
    local = run.data.tags.get(CHECKPOINT_DIR_TAG)
    if local and list_checkpoints(local):
        return list_checkpoints(local)[-1]
    names = sorted(a.path for a in tracker.client.list_artifacts(run_id, "checkpoints"))
    if not names:
        raise CheckpointError(
            f"trainer.resume={run_id}: the run has no checkpoints (locally or in MLflow); "
            f"train with trainer.checkpoint_to_mlflow=true to keep them in the store"
        )
    target = Path(tempfile.mkdtemp(prefix="pocketgpt-resume-"))
    local_file = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=names[-1], dst_path=str(target), tracking_uri=tracker.uri
    )
    return Path(local_file)
