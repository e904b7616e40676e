"""``pocketgpt-import-journal PATH``: send a run's tracking journal to its MLflow run.

A run whose tracking server was still away at its end wrote its unsent figures (and final
model, and end status) to ``tracking_outbox.jsonl`` in its output folder; this sends them once
the server answers again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pocketgpt.cli import one_line_errors, quiet_mlflow
from pocketgpt.tracking.outbox import IMPORT_COMMAND, JOURNAL_NAME


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=IMPORT_COMMAND,
        description="Send a run's tracking journal (written while its server was away) to it.",
    )
    parser.add_argument("journal", type=Path, help=f"the run's {JOURNAL_NAME}")
    parser.add_argument("--tracking-uri", help="the store to send to (default: the run's own)")
    args = parser.parse_args(argv)
    quiet_mlflow()
    with one_line_errors():
        from pocketgpt.tracking.run import import_journal

        run_id = import_journal(args.journal, args.tracking_uri)
    print(f"imported {args.journal} into MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
