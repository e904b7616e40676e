"""Does training scale over processes? Tokens/s of the same job as 1 process x 1 thread,
1 process x 2 threads and 2 processes x 1 thread (torchrun, DDP over gloo).

    python benchmarks/bench_ddp.py [--steps 60] [--repeats 3] [--no-write]

Each contender is the real command (``python -m pocketgpt.train`` or ``torchrun
--nproc_per_node=2 -m pocketgpt.train``) on the default model and corpus, with evaluation,
sampling and model logging off; its figure is the median of the ``tokens_per_sec`` it logged to
MLflow after the first ``--warmup`` steps (tokens/s counts every process's rows: the global
batch). Contenders run one at a time, interleaved, in a rotating order. Scaling efficiency of
P processes = tokens/s(P x 1) / (P x tokens/s(1 x 1)).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import append_section, header, set_summary, table

CONTENDERS = {
    "1 process x 1 thread": (1, 1),
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread (DDP, gloo)": (2, 1),
}


def run_one(procs: int, threads: int, steps: int, warmup: int, workdir: Path) -> float:
    """Train ``steps`` steps; the median logged tokens/s after ``warmup`` steps."""
    from mlflow import MlflowClient

    store = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = [
        f"trainer.max_steps={steps}",
        f"trainer.eval_interval={steps * 10}",
        "trainer.eval_at_start=false",
        "trainer.eval_max_batches=1",
        "trainer.log_interval=5",
        "trainer.checkpoint_interval=null",
        "trainer.sample_tokens=1",
        "trainer.progress=false",
        f"trainer.threads={threads}",
        "tracking.log_model=false",
        "tracking.system_metrics=false",
        f"tracking.uri={store}",
        f"hydra.run.dir={workdir / 'out'}",
    ]
    bin_dir = Path(sys.executable).parent
    if procs == 1:
        cmd = [sys.executable, "-m", "pocketgpt.train", *overrides]
    else:
        cmd = [str(bin_dir / "torchrun"), f"--nproc_per_node={procs}", "-m", "pocketgpt.train"]
        cmd += overrides
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("pocketgpt").experiment_id])
    history = client.get_metric_history(run.info.run_id, "tokens_per_sec")
    return statistics.median(m.value for m in history if m.step > warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    results: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    names = list(CONTENDERS)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
                procs, threads = CONTENDERS[name]
                value = run_one(procs, threads, args.steps, args.warmup, Path(tmp))
            results[name].append(value)
            print(f"repeat {r + 1}: {name}: {value:,.0f} tokens/s", flush=True)

    base = statistics.median(results["1 process x 1 thread"])
    rows = []
    for name, values in results.items():
        procs, threads = CONTENDERS[name]
        med = statistics.median(values)
        efficiency = med / (procs * threads * base)
        rows.append(
            [
                name,
                f"{med:,.0f}",
                " / ".join(f"{v:,.0f}" for v in values),
                f"{med / base:.2f}x",
                f"{efficiency:.0%}",
            ]
        )
    headers = ["contender", "tokens/s (median)", "runs", "vs 1 x 1", "scaling efficiency"]
    text = table(headers, rows)
    print(text)
    if args.no_write:
        return
    ddp = statistics.median(results["2 processes x 1 thread (DDP, gloo)"])
    two = statistics.median(results["1 process x 2 threads"])
    body = (
        header(f"gpt_mini, {args.steps} steps, median of {args.repeats}")
        + f"- work: the default job (gpt_mini, batch 16 x 128), tokens/s as logged after step "
        f"{args.warmup}, evaluation and model logging off; contenders interleaved\n\n" + text + "\n"
    )
    append_section("DDP: scaling over processes", body)
    set_summary(
        "DDP",
        f"2 processes x 1 thread: {ddp / base:.2f}x one process x 1 thread "
        f"({ddp / (2 * base):.0%} efficiency); 1 process x 2 threads {two / base:.2f}x",
        "measured",
    )


if __name__ == "__main__":
    main()
