"""Which model variants and recipe changes pay on a CPU: each alone, and the experiment=fast
preset, against today's default and the lr-tuned nanoGPT-style reference (issue 16).

    python benchmarks/bench_variants.py                          # every contender, 3 seeds
    python benchmarks/bench_variants.py --contenders reference default fast --seeds 1 2 3

Every contender trains ``--steps`` steps (batch 16 x 128, one torch thread, a fresh process)
and is evaluated every ``--eval-every`` steps on the first ``--eval-batches`` validation
batches (bits per byte; the time of evaluation left out of every clock). The runs go
``--jobs`` at once, seed by seed, in an order rotated per seed, so a contender does not always
share the machine with the same neighbour. Per contender and seed it reports:

- **time to the reference's final bpb** (the reference of the same seed), as a ratio of the
  reference's training time (resolution: one evaluation interval);
- **bpb at a fixed wall budget**: the last evaluation at or before the reference's median
  training time (a contender that finished earlier: its final figure);
- the final bpb and ms/step;
- for the position contenders (``extrapolate``): the bpb of the trained model on windows of
  twice the trained context (the same validation tokens), beside its bpb at the trained length.

The reference is ``benchmarks/nanogpt_ref.py`` (nanoGPT's small-model recipe) with ``--ref-lr``
(3e-3: the best of 1e-3, 2e-3, 3e-3, 6e-3 at 200 and 600 steps, BENCHMARKS.md section (e)).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTION = "(g) Model variants and the fast recipe"
TARGET = 0.25  # experiment=fast's time to the reference's final bpb, x the reference's time

# name -> (pocketgpt overrides, or None for the reference; evaluate at 2x context)
CONTENDERS: dict[str, tuple[list[str] | None, bool]] = {
    "reference": (None, False),
    "default": ([], False),
    "learned (max_len 256)": (["model.max_len=256"], True),
    "rope": (["model.position=rope", "model.max_len=256"], True),
    "alibi": (["model.position=alibi", "model.max_len=256"], True),
    "rmsnorm": (["model.norm=rmsnorm"], False),
    "relu2": (["model.activation=relu2"], False),
    "swiglu (d_ff 344)": (["model.activation=swiglu", "model.d_ff=344"], False),
    "qk_norm": (["model.qk_norm=true"], False),
    "zero_init_proj": (["model.zero_init_proj=true"], False),
    "logit_softcap 15": (["model.logit_softcap=15"], False),
    "untied head": (["model.tie_embeddings=false"], False),
    "muon": (["optim=muon"], False),
    "wsd": (["optim.schedule=wsd"], False),
    "fast": (["experiment=fast"], False),
}


def worker_reference(args) -> dict:
    import bench_convergence

    ns = SimpleNamespace(
        threads=args.threads,
        seed=args.seed,
        steps=args.steps,
        lr=args.ref_lr,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
    )
    return bench_convergence.worker_bare(ns) | {"chose": "nanogpt_ref"}


def worker_pocketgpt(args) -> dict:
    import contextlib
    import tempfile

    import _compose
    import torch

    from pocketgpt.evaluation import evaluate
    from pocketgpt.train import build
    from pocketgpt.trainer import TrainerHooks

    tmp = Path(tempfile.mkdtemp(prefix="bench-variants-"))
    cfg = _compose.compose_train(
        [
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"trainer.checkpoint_dir={tmp / 'checkpoints'}",
            f"cache_dir={_compose.CACHE}",
            f"trainer.max_steps={args.steps}",
            f"trainer.eval_interval={args.eval_every}",
            f"trainer.seed={args.seed}",
            f"trainer.threads={args.threads}",
            f"trainer.eval_max_batches={args.eval_batches}",
            f"optim.warmup_steps={warmup(args.steps)}",
            "trainer.checkpoint_interval=null",
            "trainer.sample_tokens=0",
            "tracking.log_model=false",
            "tracking.system_metrics=false",
            *args.override,
        ]
    )
    log = tmp / "train.log"
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        job = build(cfg)
        # The training loop alone: no MLflow run, test evaluation or sample (not timed anyway).
        job.trainer.hooks = TrainerHooks()
        result = job.trainer.fit()
    lines = log.read_text().splitlines()
    out = {
        "curve": [
            {"step": e["step"], "time": e["train_seconds"], "bpb": e["bpb"]} for e in result.evals
        ],
        "chose": next((ln for ln in lines if ln.startswith("trainer:")), ""),
        "params": job.model.num_params(),
    }
    if args.extrapolate:
        model, val, block = job.model.eval(), job.splits["validation"], job.cfg.data.block_size
        cpu = torch.device("cpu")
        # The same validation tokens: n batches of 16 windows at the trained length, n / 2 at
        # twice it.
        out["bpb_1x"] = evaluate(model, val, block, 16, cpu, max_batches=args.eval_batches).bpb
        out["bpb_2x"] = evaluate(
            model, val, 2 * block, 16, cpu, max_batches=max(1, args.eval_batches // 2)
        ).bpb
    return out


def warmup(steps: int) -> int:
    """nanoGPT's 100 warm-up steps of 600, scaled to the budget: every contender's warm-up."""
    return round(100 * min(1.0, steps / 600))


def run_contender(name: str, args, seed: int) -> dict:
    import _report

    overrides, extrapolate = CONTENDERS[name]
    argv = ["--steps", str(args.steps), "--eval-every", str(args.eval_every)]
    argv += ["--seed", str(seed), "--threads", str(args.threads)]
    argv += ["--eval-batches", str(args.eval_batches), "--ref-lr", repr(args.ref_lr)]
    argv += [a for o in overrides or [] for a in ("--override", o)]
    argv += ["--extrapolate"] if extrapolate else []
    kind = "reference" if overrides is None else "pocketgpt"
    t0 = time.perf_counter()
    res = _report.run_worker(__file__, kind, argv)
    c = res["curve"][-1]
    print(
        f"  seed {seed} {name}: final bpb {c['bpb']:.4f} after {c['time']:.1f} s "
        f"({time.perf_counter() - t0:.0f} s wall)",
        flush=True,
    )
    return res


def first_at(curve: list[dict], target: float) -> dict | None:
    """The first evaluation at or below ``target`` bpb."""
    return next((p for p in curve if p["bpb"] <= target + 1e-9), None)


def bpb_at(curve: list[dict], seconds: float) -> float | None:
    """The last evaluation at or before ``seconds`` of training (None: none that early)."""
    before = [p for p in curve if p["time"] <= seconds + 1e-9]
    return before[-1]["bpb"] if before else None


def spread(values: list[float | None], fmt: str = "{:.4f}") -> str:
    """median (min-max) of the values given; a None (no figure) is left out and counted."""
    missing = values.count(None)
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if missing:
        return spread(values, fmt) + f", {len(values)} of {len(values) + missing} seeds"
    med = fmt.format(statistics.median(values))
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(args, results: dict[str, dict[int, dict]], loads: list[str]) -> str:
    import _report

    ref = results["reference"]
    budget = statistics.median(ref[s]["curve"][-1]["time"] for s in ref)
    rows, extra = [], []
    for name, per_seed in results.items():
        ratios, steps, at_budget, finals, ms = [], [], [], [], []
        for seed, r in per_seed.items():
            curve = r["curve"]
            target = ref[seed]["curve"][-1]["bpb"]
            hit = first_at(curve, target)
            ratios.append(hit["time"] / ref[seed]["curve"][-1]["time"] if hit else None)
            steps.append(hit["step"] if hit else None)
            at_budget.append(bpb_at(curve, budget))
            finals.append(curve[-1]["bpb"])
            ms.append(1000 * curve[-1]["time"] / curve[-1]["step"])
        reached = [x for x in ratios if x is not None]
        ratio = spread(ratios, "{:.2f}x")
        step_cells = ", ".join(str(x) if x is not None else "-" for x in steps)
        rows.append(
            [
                f"**{name}**" if name == "fast" else name,
                " ".join(f"`{o}`" for o in CONTENDERS[name][0] or []) or "-",
                spread(finals),
                spread(at_budget),
                step_cells,
                ratio if reached else "not reached",
                f"{statistics.median(ms):.0f}",
            ]
        )
        if "bpb_2x" in next(iter(per_seed.values())):
            extra.append(
                [
                    name,
                    spread([r["bpb_1x"] for r in per_seed.values()]),
                    spread([r["bpb_2x"] for r in per_seed.values()]),
                ]
            )
    main = _report.table(
        [
            "contender",
            "overrides",
            f"final bpb at step {args.steps}",
            f"bpb at {budget:.0f} s",
            "step reaching the reference's final bpb, per seed",
            "time to it / the reference's time",
            "ms/step",
        ],
        rows,
    )
    parts = [
        main,
        "",
        f"- medians over seeds {', '.join(map(str, args.seeds))} (range in brackets); "
        f"{args.steps} steps of 16 x 128 tokens, 1 torch thread per process, {args.jobs} "
        f"processes at once, order rotated per seed; evaluation every {args.eval_every} steps "
        f"on the first {args.eval_batches} validation batches, its time left out of the clocks",
        f"- the fixed wall budget ({budget:.0f} s) is the reference's median training time; the "
        f"reference: nanogpt_ref.py at lr {args.ref_lr:g} (min_lr lr/10); every contender warms "
        f"up for {warmup(args.steps)} steps (nanoGPT's 100 of 600, scaled to the budget)",
        f"- load average {'; '.join(loads)}",
    ]
    if extra:
        parts += [
            "",
            "Extrapolation: the position contenders' final models on the same validation tokens "
            "in windows of the trained 128 and of 256 (learned: rows 128-255 of its table were "
            "never trained):",
            "",
            _report.table(["contender", "bpb at 128", "bpb at 256"], extra),
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ref-lr", type=float, default=3e-3)
    ap.add_argument("--save", help="also write the raw curves to this JSON file")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="no runs: report the curves saved by earlier --save runs (a later file's contender "
        "and seed replace an earlier one's)",
    )
    ap.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1337, help=argparse.SUPPRESS)
    ap.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--extrapolate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        fn = {"reference": worker_reference, "pocketgpt": worker_pocketgpt}[args.worker]
        Path(args.json).write_text(json.dumps(fn(args)))
        return 0

    from concurrent.futures import ThreadPoolExecutor

    import _report

    if args.merge:
        merged: dict[str, dict[int, dict]] = {}
        for path in args.merge:
            for name, per_seed in json.loads(Path(path).read_text()).items():
                merged.setdefault(name, {}).update({int(s): r for s, r in per_seed.items()})
        args.seeds = sorted({s for per_seed in merged.values() for s in per_seed})
        order = [n for n in CONTENDERS if n in merged]
        print(report(args, {n: merged[n] for n in order}, ["(see the runs merged)"]))
        return 0

    names = list(dict.fromkeys(["reference", *args.contenders]))
    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    loads = [f"before: {_report.load_average()}"]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for k, seed in enumerate(args.seeds):
            order = names[k % len(names) :] + names[: k % len(names)]
            futures = {n: pool.submit(run_contender, n, args, seed) for n in order}
            for n, f in futures.items():
                results[n][seed] = f.result()
            loads.append(f"after seed {seed}: {_report.load_average()}")
    if args.save:
        Path(args.save).write_text(json.dumps({n: r for n, r in results.items()}, indent=1))
    text = report(args, results, loads)
    print(text)
    if not args.no_write:
        head = _report.header(
            f"{len(names)} contenders, {args.steps} steps, {len(args.seeds)} seeds", argv
        )
        _report.append_section(SECTION, head + "\n" + text)
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
