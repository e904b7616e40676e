"""What a run ran on: library versions, the machine, the device and threads it used.

A run records these as ``env.*`` tags (tags, not params: MLflow params cannot change once
logged, and the environment is a fact about the run, like MLflow's own ``mlflow.source.*``
tags) and the full ``pip freeze`` as ``environment/requirements.txt``. A rerun
(``pocketgpt.tracking.rerun``) compares them with its own to name what changed.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when the tags are made: reading a record needs none
    from pocketgpt.runtime import Runtime

TAG_PREFIX = "env."
REQUIREMENTS_DIR, REQUIREMENTS_FILE = "environment", "requirements.txt"
REQUIREMENTS_ARTIFACT = f"{REQUIREMENTS_DIR}/{REQUIREMENTS_FILE}"
# env.<tag> -> the distribution whose version it records: the libraries that decide a run's
# numbers (torch, numpy), its tokenizer (tokenizers), its data (datasets) and its record.
PACKAGES = {
    "torch": "torch",
    "numpy": "numpy",
    "mlflow": "mlflow",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "datasets": "datasets",
    "tokenizers": "tokenizers",
    "pocketgpt": "pocketgpt",
}
NOT_INSTALLED = "not installed"


def package_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_tags(runtime: Runtime) -> dict[str, str]:
    """``env.*`` tags of this process, once ``runtime`` has applied its device and threads."""
    import torch

    tags = {"python": platform.python_version()}
    tags.update({tag: package_version(dist) for tag, dist in PACKAGES.items()})
    device = runtime.device
    tags.update(
        {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": str(os.cpu_count()),
            # The kernels torch dispatches to (AVX2, AVX512, ...): float results on the CPU
            # can differ between them, so a bit-for-bit rerun needs the same.
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(device),
            "torch_threads": str(torch.get_num_threads()),  # what the run used, not asked for
        }
    )
    if device.type == "cuda":
        tags["gpu"] = torch.cuda.get_device_name(device)
        tags["cuda"] = str(torch.version.cuda)
    return {TAG_PREFIX + k: v for k, v in tags.items()}


def _normalize(name: str) -> str:
    """PEP 503 name normalization: ``Hydra_Core`` and ``hydra-core`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_freeze() -> str:
    """``pip freeze`` of this interpreter (``name==version`` per line, sorted), read through
    ``importlib.metadata``: no pip, no subprocess."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # first on sys.path wins, as for an import
            found.setdefault(_normalize(name), f"{name}=={dist.version}")
    return "".join(line + "\n" for _, line in sorted(found.items()))


def parse_requirements(text: str) -> dict[str, str]:
    """``pip_freeze()`` text -> {normalized name: version}."""
    out = {}
    for line in text.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            out[_normalize(name)] = version
    return out
