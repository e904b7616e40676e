"""``pocketgpt-train`` (``python -m pocketgpt.train``): compose the config, train, exit cleanly.

    pocketgpt-train [overrides]             e.g. model=gpt_small trainer.max_steps=300
    pocketgpt-train --cfg job               print the composed config, run nothing
    pocketgpt-train -m optim.lr=1e-3,3e-3   a sweep: one MLflow parent run, a child per job

Configs come from the package (``pocketgpt/conf``); ``--config-dir DIR`` adds a folder of your
own (e.g. ``DIR/experiment/mine.yaml`` for ``experiment=mine``).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pocketgpt.cli import CONFIG_PACKAGE, one_line_errors, run_hydra_command


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="train")
def _hydra_main(dcfg: DictConfig) -> float:
    from pocketgpt.train import hydra_context, train
    from pocketgpt.trainer import TrainingInterrupted

    try:
        # In a sweep the error propagates: the sweep callback records the failed job.
        with one_line_errors(reraise=hydra_context()["multirun"]):
            return train(dcfg)
    except TrainingInterrupted as e:
        print(
            f"interrupted ({e}): checkpoint {e.checkpoint}; continue with trainer.resume=auto",
            file=sys.stderr,
        )
        sys.exit(130)


def main() -> None:
    run_hydra_command(_hydra_main)


if __name__ == "__main__":
    main()
