"""Where the wall time of a training job goes: tracking, progress, evaluation, data, compute.

    python benchmarks/bench_overhead.py                          # the default job (make train)
    python benchmarks/bench_overhead.py --override trainer.max_steps=100

Runs ``python -m pocketgpt.train`` with the default config (what ``make train`` runs; any
``--override`` appended) in a fresh process, with its MLflow store and Hydra output folder in a
temporary directory, and reads back the ``time_*`` metrics that the job logs at its end: the
trainer's own ``perf_counter`` accumulators (``TrainResult.timings``): data (drawing batches),
compute (forward, backward, clipping, optimizer), tracking (``log_metrics`` calls to MLflow),
progress (the tqdm bar and its lines), eval (validation passes), checkpoint (writing them).
The rest of the process (imports, corpus and tokenizer, MLflow run set-up and artifacts, the test
evaluation, the sample, model logging) comes from the process wall time and the run's MLflow
start and end times.

Appends a dated section to BENCHMARKS.md (``--no-write`` to only print). Target: tracking +
progress reporting at most 2% of the wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report

ROOT = Path(__file__).resolve().parents[1]

SECTION = "(d) Where the wall time goes"
PARTS = ("data", "compute", "tracking", "progress", "eval", "checkpoint")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--override", action="append", default=[], help="a Hydra override")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    from mlflow.tracking import MlflowClient

    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    (tmp / "mlruns").mkdir()
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "pocketgpt.train",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp / 'outputs'}",
        *args.override,
    ]
    load_before = _report.load_average()
    print(f"load average before: {load_before}\n$ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "POCKETGPT_CACHE_DIR": str(ROOT / ".cache/pocketgpt")}
    env.pop("MLFLOW_TRACKING_URI", None)
    t_start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    t_end = time.time()
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    wall = t_end - t_start

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pocketgpt").experiment_id])
    m = run.data.metrics
    timings = {k: m.get(f"time_{k}", 0.0) for k in (*PARTS, "total")}
    fit = timings["total"]
    before_run = run.info.start_time / 1000 - t_start
    after_run = t_end - run.info.end_time / 1000
    in_run_not_fit = (run.info.end_time - run.info.start_time) / 1000 - fit
    other_fit = fit - sum(timings[p] for p in PARTS)

    rows = []
    for label, sec in [
        *[(f"fit: {p}", timings[p]) for p in PARTS],
        ("fit: other (loop bookkeeping, schedule)", other_fit),
        ("before the MLflow run (imports, config, corpus, tokenizer, model)", before_run),
        ("MLflow run set-up, test evaluation, sample, model logging", in_run_not_fit),
        ("after the run ends (interpreter exit)", after_run),
    ]:
        rows.append([label, f"{sec:.2f}", f"{sec / fit:.2%}", f"{sec / wall:.2%}"])
    rows.append(["**process wall time**", f"**{wall:.1f}**", "", "100%"])
    table = _report.table(["part", "seconds", "of fit()", "of process wall"], rows)
    reporting = timings["tracking"] + timings["progress"]
    chose = next((ln for ln in proc.stdout.splitlines() if ln.startswith("trainer:")), "")
    final = next((ln for ln in proc.stdout.splitlines() if ln.startswith("final:")), "")
    notes = [
        f"- tracking + progress reporting: {reporting:.2f} s = {reporting / fit:.2%} of fit(), "
        f"{reporting / wall:.2%} of the process wall time (target: at most 2%)",
        f"- evaluation {timings['eval'] / wall:.1%}, data loading {timings['data'] / wall:.2%}, "
        f"compute {timings['compute'] / wall:.1%} of the process wall time",
        f"- trainer.max_steps={run.data.params.get('trainer.max_steps')}, "
        f"eval_interval={run.data.params.get('trainer.eval_interval')}; overrides: "
        f"`{' '.join(args.override) or '(none)'}`",
        f"- {final}" if final else "",
        f"- log: `{chose}`" if chose else "",
        f"- load average before: {load_before}; after: {_report.load_average()}",
    ]
    notes = [n for n in notes if n]
    print(table)
    print("\n".join(notes))
    if not args.no_write:
        head = _report.header("python -m pocketgpt.train " + " ".join(args.override), argv)
        _report.append_section(SECTION, head + "\n" + table + "\n\n" + "\n".join(notes))
        if not args.override:
            share = reporting / wall
            _report.set_summary(
                "(d)",
                f"tracking + progress {share:.2%} of wall; eval {timings['eval'] / wall:.1%}, "
                f"data {timings['data'] / wall:.2%}",
                "yes" if share <= 0.02 else "no",
            )
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
