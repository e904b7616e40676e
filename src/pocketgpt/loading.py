"""Load a trained model and its tokenizer from anywhere MLflow or a disk keeps it.

    >>> model, tokenizer = pocketgpt.load("models:/pocketgpt@best")  # doctest: +SKIP

Every URI form of ``pocketgpt.tracking.registry`` works: runs:/RUN_ID/model, models:/NAME/VERSION,
models:/NAME@ALIAS, models:/m-ID (or m-ID), best:EXPERIMENT and a local folder. Nothing is
unpickled: weights load from safetensors, the config and tokenizer from JSON.

``engine="native"`` (or ``"auto"``) runs the model on the C++ engine (``pocketgpt.native``):
the model is then a ``NativeGPT``, inference only, that ``pocketgpt.sampling`` drives as it
drives a ``GPTMini``.

    >>> model, tok = pocketgpt.load("models:/pocketgpt@best", engine="native", quantize="int8")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import torch

from pocketgpt.config import EngineConfig
from pocketgpt.errors import ModelFileError
from pocketgpt.model import GPTMini
from pocketgpt.model_io import load_model, model_files
from pocketgpt.runtime import resolve_device


class Loaded(NamedTuple):
    model: GPTMini  # or a pocketgpt.native.NativeGPT (engine=native|auto): the same inference API
    tokenizer: object  # a pocketgpt.tokenizer.Tokenizer


def load_files(
    model_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    device: str = "cpu",
    engine: EngineConfig | None = None,
) -> Loaded:
    """model.safetensors + model_config.json in model_dir, and a tokenizer file -> Loaded."""
    from pocketgpt.native import open_engine
    from pocketgpt.tokenizer import load_tokenizer

    model = open_engine(model_dir, device, engine or EngineConfig())
    if model is None:
        model = load_model(model_dir, device).eval()
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ModelFileError(
            f"{tokenizer_path} has vocab_size {tokenizer.vocab_size} but the model has "
            f"{model.config.vocab_size}; use the tokenizer logged with this model"
        )
    return Loaded(model, tokenizer)


def load(
    uri: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    tracking_uri: str | None = None,
    metric: str = "val_bpb",
    mode: str = "min",
    engine: str = "torch",
    quantize: str = "none",
    kernels: str = "optimized",
    quantize_head: bool = False,
    threads: int | None = 1,
) -> Loaded:
    """Any supported URI (see the module doc) -> (model in eval mode on ``device``, tokenizer).

    ``engine`` (torch | native | auto), ``quantize`` (none | int8), ``kernels`` (optimized |
    naive), ``quantize_head`` and ``threads``: the fields of ``config.EngineConfig``.
    """
    from pocketgpt.tracking.registry import resolve

    engine_cfg = EngineConfig(  # checks itself
        engine=engine,
        quantize=quantize,
        kernels=kernels,
        quantize_head=quantize_head,
        threads=threads,
    )
    device = str(resolve_device(str(device), "device"))
    with tempfile.TemporaryDirectory(prefix="pocketgpt-load-") as tmp:
        folder = resolve(os.fspath(uri), tmp, tracking_uri, metric, mode)
        model_dir, tokenizer_path = model_files(folder)
        # The engine maps the weights file; the mapping outlives the temporary folder.
        return load_files(model_dir, tokenizer_path, device, engine_cfg)
