"""``pocketgpt-compare`` (``python -m pocketgpt.compare``): the runs of an experiment side by side.

pocketgpt-compare EXPERIMENT [--sweep ID] [--metric val_bpb] [--plot PATH]
                  [--alias NAME [--model NAME]] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pocketgpt.cli import one_line_errors, quiet_mlflow
from pocketgpt.tracking.compare import compare, format_table, set_best_alias, write_plot


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pocketgpt-compare",
        description="Compare the runs of an MLflow experiment, or of one sweep in it.",
    )
    p.add_argument("experiment", help="MLflow experiment name (tracking.experiment_name)")
    p.add_argument(
        "--sweep",
        help="only the jobs of this sweep: parent run id (or prefix), its sweep folder "
        "(e.g. 2025-01-31/12-00-00), or 'latest'",
    )
    p.add_argument("--metric", default="val_bpb", help="sort key, lower is better (val_bpb)")
    p.add_argument(
        "--plot",
        help="PNG of the validation curves (default: compare-EXPERIMENT[-SWEEP].png)",
    )
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--alias", help="set this registry alias on the best run's model version")
    p.add_argument("--model", help="registered model name, when the best run has several")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, ./mlruns)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_mlflow()
    with one_line_errors():
        c = compare(args.experiment, args.sweep, args.metric, args.tracking_uri)
        scope = f"sweep {c.sweep_id}" if c.sweep_id else "all runs"
        print(f"{c.experiment}, {scope}: {len(c.runs)} runs, sorted by {c.metric}\n")
        print(format_table(c))
        best = c.best_run
        if best is not None:
            print(f"\nbest: {best.run_id} {best.name!r} {c.metric}={best.best[c.metric]:.4f}")
        for r in c.runs:
            if r.error:
                print(f"failed: {r.run_id[:8]} job {r.job}: {r.error}")
        if not args.no_plot:
            default = f"compare-{c.experiment}" + (f"-{c.sweep_id[:8]}" if c.sweep_id else "")
            out = write_plot(c, args.plot or f"{default}.png")
            print(f"plot: {out}")
        if args.alias:
            name, version = set_best_alias(c, args.alias, args.model, args.tracking_uri)
            print(f"alias: models:/{name}@{args.alias} -> version {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
