"""Runtime policy: which device, precision, compilation and threads a job runs with, and why.

Every choice that depends on the machine rather than on the experiment lives here, so the model
and the training loop stay free of it.
"""

from __future__ import annotations

import torch

from pocketgpt.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """auto -> cuda, else mps, else cpu; an unknown or missing device is a ConfigError naming
    ``key`` (the setting it came from)."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"{key}={name!r} is not a torch device; use cpu, cuda, mps or auto"
        ) from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise ConfigError(f"{key}={name} but no {device.type} device is available; use {key}=cpu")
    return device
