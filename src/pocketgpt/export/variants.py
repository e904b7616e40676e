"""Which model architectures an export can express, decided from ``model_config.json`` alone.

Checked on the config dict, before any model is built: a folder written by a newer pocketgpt
(with variant keys this version's ``ModelConfig`` does not know) still gets the export's own
one-line answer rather than a loading error. Each format writes one or more standard layouts:
``hf`` GPT-2's (learned positions, LayerNorm, a GELU (tanh) feed-forward) or Llama's (RoPE,
RMSNorm, SwiGLU); ``onnx`` GPT-2's graph only. None has qk_norm or a logit softcap. Biases (on
or off) and an untied head are fine for every layout.
"""

from __future__ import annotations

import json
from typing import Any

from pocketgpt.errors import ExportError

# The default of each architecture key (absent means the default): GPT-2's block.
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "position": "learned",
    "norm": "layernorm",
    "activation": "gelu",
    "qk_norm": False,
    "logit_softcap": None,
}
# The architecture keys' values of each layout a format can write.
LAYOUTS: dict[str, dict[str, Any]] = {
    "gpt2": DEFAULT_ARCHITECTURE,
    "llama": {
        **DEFAULT_ARCHITECTURE,
        "position": "rope",
        "norm": "rmsnorm",
        "activation": "swiglu",
    },
}
FORMAT_LAYOUTS: dict[str, tuple[str, ...]] = {"hf": ("gpt2", "llama"), "onnx": ("gpt2",)}
# What the refusal says each format takes.
FORMAT_TAKES = {
    "hf": "GPT-2's architecture (learned positions, LayerNorm, GELU) or Llama's (RoPE, RMSNorm, "
    "SwiGLU), without qk_norm or logit_softcap, exports",
    "onnx": "the default architecture (learned positions, LayerNorm, GELU, no qk_norm, "
    "no logit_softcap) exports",
}
# Keys that change no exported operation: the shape (carried over), initialisation only,
# RoPE's base (Llama's rope_theta; unused with learned positions), biases and the head's tying
# (both handled by every layout).
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


def mismatches(config: dict[str, Any], layout: str) -> list[str]:
    """Each ``key=value`` of ``config`` that ``layout`` (a key of LAYOUTS) cannot express."""
    wanted = LAYOUTS[layout]
    out = [
        f"{key}={_show(config.get(key, DEFAULT_ARCHITECTURE[key]))}"
        for key, value in wanted.items()
        if config.get(key, DEFAULT_ARCHITECTURE[key]) != value
    ]
    # A key this version does not know: refuse, not guess.
    out += [f"{k}={_show(v)}" for k, v in config.items() if k not in NEUTRAL_KEYS | wanted.keys()]
    return out


def unsupported_setting(config: dict[str, Any], fmt: str) -> str | None:
    """The first ``key=value`` of ``config`` that keeps ``fmt`` (hf, onnx) from writing it, or
    None. With several layouts, the key named is that of the nearest one (fewest mismatches).

    >>> unsupported_setting({"d_model": 64, "position": "rope"}, "hf")
    'position=rope'
    >>> unsupported_setting({"position": "rope", "norm": "rmsnorm"}, "hf")
    'activation=gelu'
    >>> unsupported_setting({"position": "rope", "norm": "rmsnorm", "activation": "swiglu"}, "hf")
    """
    if layout_for(config, fmt) is not None:
        return None
    nearest = min((mismatches(config, name) for name in FORMAT_LAYOUTS[fmt]), key=len)
    return nearest[0]


def layout_for(config: dict[str, Any], fmt: str) -> str | None:
    """The layout (a key of LAYOUTS) ``fmt`` writes ``config`` in, or None if none fits."""
    if fmt not in FORMAT_LAYOUTS:
        raise ExportError(f"format={fmt!r} is unknown; use one of {', '.join(FORMAT_LAYOUTS)}")
    return next((name for name in FORMAT_LAYOUTS[fmt] if not mismatches(config, name)), None)


def check_exportable(config: dict[str, Any], fmt: str) -> str:
    """``config``'s layout in ``fmt`` (see layout_for); ExportError naming the first setting
    ``fmt`` cannot express if there is none."""
    layout = layout_for(config, fmt)
    if layout is None:
        bad = unsupported_setting(config, fmt)
        raise ExportError(f"cannot export this variant to {fmt}: {bad}; only {FORMAT_TAKES[fmt]}")
    return layout


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
