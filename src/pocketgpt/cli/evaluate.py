"""``pocketgpt-evaluate`` (``python -m pocketgpt.evaluate``): lm-eval tasks on a model.

    pocketgpt-evaluate model_uri=runs:/RUN_ID/model
    pocketgpt-evaluate model_uri=models:/pocketgpt@best 'tasks=[wikitext2_local,wikitext2_local_detok]'
    pocketgpt-evaluate model_uri=best:pocketgpt tasks=[wikitext2_local] local_file=wiki.test.raw
    pocketgpt-evaluate model_uri=runs:/RUN_ID/model 'tasks=[hellaswag,lambada_openai]'  # network

Settings: ``config.EvaluateConfig``. Prints one line per task metric; with ``log=true`` (the
default) they also go into the model's source run as ``lm_eval/<task>/<metric>``.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pocketgpt.cli import CONFIG_PACKAGE, one_line_errors, require_settings, run_hydra_command
from pocketgpt.config import EvaluateConfig


def run(cfg: EvaluateConfig, out=None) -> None:
    out = out or sys.stdout
    from pocketgpt.evaluate import evaluate
    from pocketgpt.evaluate.local_tasks import LOCAL_TASKS

    if all(t in LOCAL_TASKS for t in cfg.tasks):
        # lm-eval warns that any task built from a Python config could take `--metadata`: not
        # news to a user of the local tasks.
        logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    report = evaluate(
        cfg.model_uri,
        list(cfg.tasks),
        local_file=cfg.local_file,
        limit=cfg.limit,
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        device=str(cfg.device),
        log=cfg.log,
        tracking_uri=cfg.tracking_uri,
        output=cfg.output,
    )
    for task, row in report.metrics.items():
        for metric, value in row.items():
            print(f"{task:24s} {metric:24s} {value:.4f}", file=out)
    if report.logged_to:
        print(f"logged into run {report.logged_to} as lm_eval/<task>/<metric>", file=sys.stderr)
    elif cfg.log:
        print("not logged: the model is a folder, not an MLflow run's model", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="evaluate")
def _hydra_main(dcfg: DictConfig) -> None:
    require_settings(dcfg, {"model_uri": "runs:/RUN_ID/model"})
    with one_line_errors():
        run(OmegaConf.to_object(dcfg))


def main() -> None:
    run_hydra_command(_hydra_main)


if __name__ == "__main__":
    main()
