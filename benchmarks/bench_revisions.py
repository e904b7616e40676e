"""Training throughput of two revisions of pocketgpt, interleaved: did a change slow the step?

    python benchmarks/bench_revisions.py --before 5384d05            # vs the working tree
    python benchmarks/bench_revisions.py --before v1 --after v2 --repeats 5

Each revision is exported (``git archive``) into a temporary folder, the working tree is used as
it is, and each repeat trains both in turn, in fresh processes, through their own command line
(``python -m pocketgpt.train``: the one interface every revision has), with the default model
and data at ``--steps`` steps, no evaluation and no logged model. A run's figure is the median of
its logged ``tokens_per_sec`` windows, the first window (warm-up) left out; the table gives each
revision's median and the median of the per-repeat ratios, so load changes on a shared machine
hit both alike. A first, unmeasured run of each revision trains and caches its tokenizer.
Appends a dated section to BENCHMARKS.md under "(a) Training throughput" (``--no-write``: print
only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import _report

STEPS = 80
LOG_INTERVAL = 10


def export(revision: str, dst: Path) -> Path:
    """The files of ``revision`` in ``dst`` (``None``/"." = the working tree as it is)."""
    if revision == ".":
        return _report.ROOT
    archive = dst / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", revision], cwd=_report.ROOT, stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dst / "tree", filter="data")
    return dst / "tree"


def train_once(tree: Path, steps: int, work: Path, cache: Path, threads: int | None) -> float:
    """Median tokens/s of one training run of ``tree`` in a fresh process (first window out)."""
    from mlflow.tracking import MlflowClient

    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "POCKETGPT_CACHE_DIR": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    overrides = [
        f"trainer.max_steps={steps}",
        f"trainer.eval_interval={steps * 10}",
        "trainer.eval_at_start=false",
        "trainer.eval_max_batches=1",
        f"trainer.log_interval={LOG_INTERVAL}",
        "trainer.progress=false",
        "trainer.sample_tokens=1",
        "trainer.checkpoint_interval=null",
        "tracking.log_model=false",
        *([f"trainer.threads={threads}"] if threads else []),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pocketgpt.train", *overrides],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"training {tree} failed:\n{proc.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = sorted(
        client.get_metric_history(run.info.run_id, "tokens_per_sec"), key=lambda m: m.step
    )
    return statistics.median(m.value for m in history[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision to compare against")
    ap.add_argument("--after", default=".", help="git revision (default: the working tree)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="trainer.threads (default: torch's)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append results")
    args = ap.parse_args(argv)

    load_before = _report.load_average()
    with tempfile.TemporaryDirectory(prefix="pocketgpt-revisions-") as tmp:
        tmp = Path(tmp)
        names = {"before": args.before, "after": args.after}
        trees = {}
        for key, rev in names.items():
            (tmp / key).mkdir()
            trees[key] = export(rev, tmp / key)
        rates: dict[str, list[float]] = {key: [] for key in names}
        for key in names:  # warm-up: trains and caches each revision's tokenizer
            train_once(
                trees[key],
                LOG_INTERVAL * 2,
                tmp / f"warm-{key}",
                tmp / f"cache-{key}",
                args.threads,
            )
        for i in range(args.repeats):
            order = list(names) if i % 2 == 0 else list(reversed(names))
            for key in order:
                rate = train_once(
                    trees[key], args.steps, tmp / f"{key}-{i}", tmp / f"cache-{key}", args.threads
                )
                rates[key].append(rate)
                print(f"repeat {i}: {key} ({names[key]}) {rate:,.0f} tokens/s", flush=True)
    ratios = [a / b for a, b in zip(rates["after"], rates["before"], strict=True)]
    rows = [
        [f"before ({args.before})", f"{statistics.median(rates['before']):,.0f}", "1.00x"],
        [
            f"after ({'working tree' if args.after == '.' else args.after})",
            f"{statistics.median(rates['after']):,.0f}",
            f"{statistics.median(ratios):.3f}x (per repeat: "
            + ", ".join(f"{r:.3f}" for r in ratios)
            + ")",
        ],
    ]
    body = "\n".join(
        [
            f"- work: the default model and data, {args.steps} steps of 16 x 128 tokens through "
            "`python -m pocketgpt.train` in a fresh process per run, tokens/s = median of the "
            f"logged {LOG_INTERVAL}-step windows (the first left out); repeats alternate which "
            "revision goes first",
            f"- load average before: {load_before}; after: {_report.load_average()}",
            "",
            _report.table(["revision", "tokens/s (median)", "vs before (median ratio)"], rows),
        ]
    )
    print(body)
    if not args.no_write:
        head = _report.header(
            f"revision {args.after} vs {args.before}, {args.repeats} repeats", argv
        )
        _report.append_section("(a) Training throughput", head + "\n" + body)
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
