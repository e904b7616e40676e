"""Which model architectures an export can express, decided from ``model_config.json`` alone.

Checked on the config dict, before any model is built: a folder written by a newer pocketgpt
(with variant keys this version's ``ModelConfig`` does not know) still gets the export's own
one-line answer rather than a loading error. The exported graphs (GPT-2's layout for
transformers, the ONNX decoder) implement the default architecture: learned positions,
LayerNorm, a GELU (tanh) feed-forward, plain attention logits. An untied head is fine for both.
"""

from __future__ import annotations

import json
from typing import Any

from pocketgpt.errors import ExportError

# The default of each architecture key (absent means the default).
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "position": "learned",
    "norm": "layernorm",
    "activation": "gelu",
    "qk_norm": False,
    "logit_softcap": None,
}
# Keys that change no exported tensor or operation: the shape (carried over), initialisation
# only, RoPE's base (unused with learned positions), and the head's tying (handled).
NEUTRAL_KEYS = {
    "architecture",
    "vocab_size",
    "d_model",
    "n_heads",
    "d_ff",
    "num_layers",
    "max_len",
    "dropout",
    "bias",
    "zero_init_proj",
    "rope_base",
    "tie_embeddings",
}


def unsupported_setting(config: dict[str, Any]) -> str | None:
    """The first ``key=value`` of ``config`` the exports cannot express, or None.

    >>> unsupported_setting({"d_model": 64, "position": "rope"})
    'position=rope'
    >>> unsupported_setting({"d_model": 64, "qk_norm": False}) is None
    True
    """
    for key, default in DEFAULT_ARCHITECTURE.items():
        value = config.get(key, default)
        if value != default:
            return f"{key}={_show(value)}"
    for key, value in config.items():
        if key not in NEUTRAL_KEYS and key not in DEFAULT_ARCHITECTURE:
            return f"{key}={_show(value)}"  # a key this version does not know: refuse, not guess
    return None


def check_exportable(config: dict[str, Any], fmt: str) -> None:
    """Raise ExportError naming the first setting ``fmt`` (hf, onnx) cannot express."""
    bad = unsupported_setting(config)
    if bad is not None:
        raise ExportError(
            f"cannot export this variant to {fmt}: {bad}; only the default architecture "
            "(learned positions, LayerNorm, GELU, no qk_norm, no logit_softcap) exports"
        )


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
