"""The native CPU engine: GPTMini inference in C++ (``csrc/``), bridged to Python.

``open_engine(model_dir, device, EngineConfig)`` picks the engine a loaded model runs on: a
``NativeGPT`` (this package) where the C++ extension is built, the device is the CPU and the
model's architecture is one the engine implements; otherwise ``None`` (PyTorch), with a one-line
notice for ``engine=auto`` and a one-line error for ``engine=native``.

``NativeGPT`` offers the inference interface ``pocketgpt.sampling`` drives (``config``,
``device``, ``new_kv_cache``, ``last_logits``, ``__call__``), so sampling, streaming and seeds
stay the one Python implementation: the engine hands back logits, Python samples from them.
How the kernels work and what each step buys: docs/native.md.
"""

from __future__ import annotations

import logging
import os

from pocketgpt.config import Engine, EngineConfig, ModelConfig
from pocketgpt.errors import ConfigError

log = logging.getLogger("pocketgpt.native")

# The architecture the engine implements: for each ModelConfig field of the model variants (issue
# 16), the value it must have. A field the config does not have yet is the default architecture.
SUPPORTED = {
    "position": "learned",
    "norm": "layernorm",
    "activation": "gelu",
    "qk_norm": False,
    "logit_softcap": None,
    "tie_embeddings": True,
}


def extension_error() -> str | None:
    """Why the C++ extension cannot be imported, or None when it can."""
    try:
        from pocketgpt.native._engine import Engine  # noqa: F401
    except ImportError as e:
        return (
            f"the C++ extension is not built ({e}); reinstall with a C++ compiler: pip install -e ."
        )
    return None


def unsupported_reason(config: ModelConfig) -> str | None:
    """The first setting of ``config`` the engine does not implement, as 'key=value', or None."""
    for key, wanted in SUPPORTED.items():
        value = getattr(config, key, wanted)
        value = getattr(value, "value", value)  # an Enum member -> its string
        if value != wanted:
            return f"{key}={value}"
    return None


def open_engine(model_dir: str | os.PathLike, device: str, cfg: EngineConfig):
    """-> a NativeGPT for the model folder, or None where PyTorch should run it (see module doc)."""
    from pocketgpt.model_io import read_model_config

    if cfg.engine == Engine.torch:
        return None
    config = read_model_config(model_dir)
    reason = None
    if str(device) != "cpu":
        reason = f"device={device}: the native engine runs on the CPU only"
    elif (bad := unsupported_reason(config)) is not None:
        reason = f"the model has {bad}, which the native engine does not implement"
    else:
        reason = extension_error()
    if reason is None:
        from pocketgpt.native.bridge import NativeGPT

        return NativeGPT(model_dir, config, cfg)
    if cfg.engine == Engine.native:
        raise ConfigError(
            f"engine=native cannot run this model: {reason}; use engine=auto or torch"
        )
    dropped = f" (quantize={cfg.quantize.value} not applied)" if cfg.quantize != "none" else ""
    log.warning("engine=auto: generating with PyTorch%s, because %s", dropped, reason)
    return None
