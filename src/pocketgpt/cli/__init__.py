"""Command-line entry points: ``pocketgpt-train``, ``-generate``, ``-compare``, ``-export``,
``-evaluate`` and ``-import-journal``.

Each command only composes its settings, calls the library and prints. They share
``one_line_errors``: any ``PocketGPTError`` (a bad setting, file, URI or store) ends the command
with one ``error:`` line on stderr and exit status 2 instead of a traceback
(``HYDRA_FULL_ERROR=1`` shows the traceback).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pocketgpt.config import register_configs
from pocketgpt.errors import PocketGPTError

CONFIG_PACKAGE = "pkg://pocketgpt.conf"  # Hydra's configs ship inside the package


def require_settings(dcfg, examples: dict[str, str]) -> None:
    """Exit 2 with one line naming the first required setting (``???`` in its schema) that was
    not given, and an example of it; ``examples``: {key: example value}."""
    from omegaconf import OmegaConf

    for key, example in examples.items():
        if OmegaConf.is_missing(dcfg, key):
            print(f"error: {key} is missing; add {key}={example}", file=sys.stderr)
            sys.exit(2)


def quiet_mlflow() -> None:
    """No MLflow progress bar per artifact file: the commands print their own progress.

    A process-wide setting (MLflow reads it from the environment), so only the commands make it,
    once, at start; a user's own choice in the environment wins.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextmanager
def one_line_errors(reraise: bool = False) -> Iterator[None]:
    """Turn a PocketGPTError into ``error: <message>`` and exit 2; ``reraise`` lets it through
    (a sweep job, whose launcher records the failure and goes on)."""
    try:
        yield
    except PocketGPTError as e:
        if reraise or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_hydra_command(hydra_main: Callable[[], object]) -> None:
    """Start a Hydra command: MLflow quiet, the schemas registered, then Hydra's own main."""
    quiet_mlflow()
    register_configs()
    hydra_main()
