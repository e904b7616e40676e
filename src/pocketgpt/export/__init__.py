"""Export a pocketgpt model for other tools: a transformers folder (hf) or an ONNX graph (onnx).

    pocketgpt-export model_uri=runs:/RUN_ID/model format=hf out=exported/hf
    pocketgpt-export model_uri=models:/pocketgpt@best format=onnx out=exported/onnx log=true

``export`` reads the model folder (any URI ``pocketgpt.load`` takes), refuses an architecture
the format cannot express (``variants``), writes the new folder under a temporary name and
renames it into place, so ``out`` is either complete or untouched. ``hf``: see ``export.hf``
(GPT-2's or Llama's layout); ``onnx``: ``export.onnx`` (model.onnx, onnx_config.json and the
model's tokenizer.json).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pocketgpt.atomic import atomic_folder
from pocketgpt.errors import ExportError, ModelFileError
from pocketgpt.export.variants import check_exportable

FORMATS = ("hf", "onnx")


def read_model_config(model_dir: Path) -> dict:
    """model_config.json as a plain dict (no ModelConfig: newer keys must not fail here)."""
    from pocketgpt.model_io import CONFIG_FILE

    path = model_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing; expected a folder written by pocketgpt") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path} does not describe a GPTMini model")
    return raw


def export(
    model_uri: str,
    fmt: str,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    log: bool = False,
    tracking_uri: str | None = None,
    opset: int = 18,
) -> Path:
    """Write the ``fmt`` export of ``model_uri`` to the folder ``out`` -> ``out``.

    ``log``: also log the folder into the model's source run, under ``export/<fmt>``.
    """
    from pocketgpt.loading import load_files
    from pocketgpt.model_io import model_files
    from pocketgpt.tracking.registry import resolve

    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(
            f"{out} already exists; pass overwrite=true to replace it, or pick another out="
        )
    with tempfile.TemporaryDirectory(prefix="pocketgpt-export-") as tmp:
        folder = resolve(str(model_uri), tmp, tracking_uri)
        model_dir, tokenizer_path = model_files(folder)
        check_exportable(read_model_config(model_dir), fmt)
        source = None
        if log:
            from pocketgpt.tracking.source import source_of

            source = source_of(str(model_uri), tracking_uri)
            if source is None:
                raise ExportError(
                    f"log=true needs a model logged in MLflow (runs:/, models:/, best:); "
                    f"{model_uri} is a folder with no run: drop log=true"
                )
        model, tokenizer = load_files(model_dir, tokenizer_path)
        with atomic_folder(out, replace=overwrite) as staging:
            if fmt == "hf":
                from pocketgpt.export.hf import write_hf

                write_hf(model, tokenizer, staging)
            else:
                from pocketgpt.export.onnx import export_onnx

                export_onnx(model, staging / "model.onnx", opset=opset)
                shutil.copyfile(tokenizer_path, staging / "tokenizer.json")
    if source is not None:
        from pocketgpt.tracking.source import log_folder

        log_folder(source, out, f"export/{fmt}")
    return out
