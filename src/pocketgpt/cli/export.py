"""``pocketgpt-export`` (``python -m pocketgpt.export``): a model as a transformers or ONNX folder.

    pocketgpt-export model_uri=runs:/RUN_ID/model format=hf out=exported/hf
    pocketgpt-export model_uri=models:/pocketgpt@best format=onnx out=exported/onnx
    pocketgpt-export model_uri=best:pocketgpt format=hf out=exported/hf overwrite=true log=true

Settings: ``config.ExportConfig``. The folder appears complete or not at all; an existing
``out`` is replaced only with ``overwrite=true``. ``log=true`` also logs it into the model's
source run (artifact path ``export/hf`` or ``export/onnx``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from pocketgpt.cli import CONFIG_PACKAGE, one_line_errors, require_settings, run_hydra_command
from pocketgpt.config import ExportConfig


def run(cfg: ExportConfig) -> None:
    from pocketgpt.export import export

    out = export(
        cfg.model_uri,
        str(cfg.format),
        cfg.out,
        overwrite=cfg.overwrite,
        log=cfg.log,
        tracking_uri=cfg.tracking_uri,
        opset=cfg.opset,
    )
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {cfg.model_uri} as {cfg.format} to {out} ({files})")
    if cfg.log:
        print(f"logged into the model's run as export/{cfg.format}")


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="export")
def _hydra_main(dcfg: DictConfig) -> None:
    require_settings(dcfg, {"model_uri": "runs:/RUN_ID/model", "out": "exported/hf"})
    with one_line_errors():
        run(OmegaConf.to_object(dcfg))


def main() -> None:
    run_hydra_command(_hydra_main)


if __name__ == "__main__":
    main()
