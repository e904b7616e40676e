"""``pocketgpt-train`` (``python -m pocketgpt.train``): compose the config, train, exit cleanly.

    pocketgpt-train [overrides]             e.g. model=gpt_small trainer.max_steps=300
    pocketgpt-train --cfg job               print the composed config, run nothing
    pocketgpt-train -m optim.lr=1e-3,3e-3   a sweep: one MLflow parent run, a child per job
    pocketgpt-train +rerun=RUN_ID [overrides]   a logged run again, from its MLflow record
    torchrun --nproc_per_node=2 -m pocketgpt.train [overrides]   DDP over 2 processes

Configs come from the package (``pocketgpt/conf``); ``--config-dir DIR`` adds a folder of your
own (e.g. ``DIR/experiment/mine.yaml`` for ``experiment=mine``).
"""

from __future__ import annotations

import sys
import tempfile

import hydra
from omegaconf import DictConfig

from pocketgpt.cli import CONFIG_PACKAGE, one_line_errors, quiet_mlflow, run_hydra_command


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
    from pocketgpt.distributed import from_environment
    from pocketgpt.tracking.rerun import rerun_command_line

    quiet_mlflow()
    # +rerun=RUN_ID: Hydra composes that run's logged config instead of conf/train.yaml.
    with (
        one_line_errors(),
        rerun_command_line(sys.argv[1:]) as args,
        tempfile.TemporaryDirectory(prefix="pocketgpt-rank-") as scratch,
    ):
        if from_environment()[0] > 0:
            # torchrun's other ranks: rank 0 owns the output folder and the job's log; these
            # compose the same config with a throwaway folder and no log file.
            args += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
            args += ["hydra/job_logging=disabled"]
        sys.argv = [sys.argv[0], *args]
        run_hydra_command(_hydra_main)


if __name__ == "__main__":
    main()
