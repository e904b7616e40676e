"""Time to a validation bits-per-byte on the embedded corpus: pocketgpt's default recipe vs the
bare nanoGPT-style reference with its learning rate tuned the way pocketgpt's was.

    python benchmarks/bench_convergence.py                      # sweep, then 3 seeds, 2 at once
    python benchmarks/bench_convergence.py --ref-lrs 2e-3 --seeds 1 2 3 4 5   # no sweep
    python benchmarks/bench_convergence.py --override optim.lr=2e-3           # another recipe

1. **The reference's learning rate** (``--ref-lrs``, one run each at the first seed, evaluation
   every ``--sweep-eval-every`` steps): pocketgpt's default lr was chosen by the final
   validation bpb of one 600-step run per rate (BENCHMARKS.md section (e)); the reference gets
   the same treatment, over rates around nanoGPT's 1e-3, its minimum lr kept at a tenth of the
   peak (nanoGPT's rule, and pocketgpt's ``min_lr_ratio``). The rate with the lowest final bpb
   is the tuned reference. Only the bpb is compared here, so these runs go ``--jobs`` at once.
2. **Seeds** (``--seeds``): for each seed the tuned reference (``benchmarks/nanogpt_ref.py``:
   nanoGPT's small-model recipe, warm-up 100, cosine, betas (0.9, 0.99), weight decay 0.1, clip
   1.0, batch 16 x 128, random windows) and pocketgpt's default recipe (``python -m
   pocketgpt.train`` as is: Hydra, MLflow, checkpoints) train ``--steps`` steps with that seed.
   With ``--jobs 2`` the two run side by side, so whatever else loads the machine loads both;
   with ``--jobs 1`` one after the other, alternating which goes first. The target of a seed is
   the reference's final bpb; pocketgpt's time to it is the training time at its first
   evaluation at or below it, divided by the reference's whole training time.

Both use the same tokens (the embedded corpus through pocketgpt's tokenizer), ``--threads``
torch threads each, and the same evaluation (``pocketgpt.evaluation.evaluate`` over the whole
validation split, bits per byte); evaluation time is left out of both clocks (it is the measuring
instrument; its cost in a default run is in section (d)). Each run is a fresh process. Target:
pocketgpt reaches the reference's final bpb in at most 0.8x the reference's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SECTION = "(e) Time to a validation bpb"
TARGET = 0.8  # pocketgpt's time to the reference's final bpb, x the reference's time


def _splits():
    from pocketgpt.config import DataConfig, TokenizerConfig
    from pocketgpt.data import load_corpus, tokenize_corpus
    from pocketgpt.tokenizer import build_tokenizer

    cache = ROOT / ".cache/pocketgpt"
    corpus = load_corpus(DataConfig(), cache)
    tok, _ = build_tokenizer(TokenizerConfig(), corpus.train, cache)
    return tok, tokenize_corpus(corpus, tok, cache)


def worker_bare(args) -> dict:
    import nanogpt_ref as ref
    import torch

    from pocketgpt.evaluation import evaluate

    torch.set_num_threads(args.threads)
    tok, splits = _splits()
    torch.manual_seed(args.seed)
    model = ref.GPT(ref.RefConfig(vocab_size=tok.vocab_size))
    curve = []
    state = {"eval": 0.0}
    t_start = time.perf_counter()

    def on_eval(it: int) -> None:
        t0 = time.perf_counter()
        res = evaluate(
            model, splits["validation"], 128, 16, torch.device("cpu"), max_batches=args.eval_batches
        )
        model.train()
        curve.append({"step": it, "time": t0 - t_start - state["eval"], "bpb": res.bpb})
        state["eval"] += time.perf_counter() - t0

    # nanoGPT keeps min_lr at a tenth of the peak (its comment cites Chinchilla). Its 100
    # warm-up iterations belong to a 600-iteration run: a shorter budget keeps the same share
    # (a fixed 100 would spend half of a 200-step run warming up).
    warmup = round(ref.RefRecipe.warmup_iters * min(1.0, args.steps / 600))
    recipe = ref.RefRecipe(learning_rate=args.lr, min_lr=args.lr / 10, warmup_iters=warmup)
    ref.train(
        model,
        str(splits["train"].tokens.filename),
        args.steps,
        recipe,
        on_eval=on_eval,
        eval_interval=args.eval_every,
        seed=args.seed,
    )
    if curve[-1]["step"] != args.steps:
        on_eval(args.steps)
    return {"curve": curve}


def worker_pocketgpt(args) -> dict:
    import _compose

    overrides = [
        f"trainer.max_steps={args.steps}",
        f"trainer.eval_interval={args.eval_every}",
        f"trainer.seed={args.seed}",
        f"trainer.threads={args.threads}",
        "tracking.log_model=false",
        *([f"trainer.eval_max_batches={args.eval_batches}"] if args.eval_batches else []),
        *args.override,
    ]
    job = _compose.train_in_temp("bench-convergence-", overrides)
    # Each validation pass of fit(): its step, and the training time before it with the
    # evaluations left out (TrainResult.evals).
    curve = [
        {"step": e["step"], "time": e["train_seconds"], "bpb": e["bpb"]}
        for e in job.outcome.result.evals
    ]
    return {"curve": curve, "chose": job.chose}


def run_worker(name: str, args, *, seed: int, eval_every: int, lr: float | None = None) -> dict:
    import _report

    argv = ["--steps", str(args.steps), "--eval-every", str(eval_every), "--seed", str(seed)]
    argv += ["--threads", str(args.threads)]
    argv += ["--eval-batches", str(args.eval_batches)] if args.eval_batches else []
    if lr is not None:
        argv += ["--lr", repr(lr)]
    argv += [a for o in args.override for a in ("--override", o)]
    return _report.run_worker(__file__, name, argv)


def time_to(curve: list[dict], target: float) -> tuple[float | None, int | None]:
    """(training seconds, step) at the first evaluation at or below target."""
    for point in curve:
        if point["bpb"] <= target + 1e-9:
            return point["time"], point["step"]
    return None, None


def at_step(curve: list[dict], step: int) -> dict | None:
    return next((p for p in curve if p["step"] == step), None)


def sweep_reference(args, pool: ThreadPoolExecutor) -> tuple[float, str]:
    """The reference's lr with the lowest final bpb (one run per lr at the first seed), and the
    sweep's table."""
    seed = args.seeds[0]
    futures = {
        lr: pool.submit(
            run_worker, "bare", args, seed=seed, eval_every=args.sweep_eval_every, lr=lr
        )
        for lr in args.ref_lrs
    }
    curves = {lr: f.result()["curve"] for lr, f in futures.items()}
    best = min(args.ref_lrs, key=lambda lr: curves[lr][-1]["bpb"])
    steps = [p["step"] for p in curves[best]]
    rows = []
    for lr in args.ref_lrs:
        mark = "**" if lr == best else ""
        cells = [f"{mark}lr {lr:g}, min_lr {lr / 10:g}{mark}"]
        for s in steps:
            p = at_step(curves[lr], s)
            cells.append(f"{p['bpb']:.4f}" if p else "")
        cells.append(f"{curves[lr][-1]['time']:.0f}")
        rows.append(cells)
        print(f"sweep: reference lr {lr:g}: final bpb {curves[lr][-1]['bpb']:.4f}", flush=True)
    import _report

    table = _report.table(
        ["reference recipe", *(f"step {s}" for s in steps), "train s (side by side)"], rows
    )
    return best, table


def compare_seed(args, pool: ThreadPoolExecutor, lr: float, seed: int, k: int) -> dict:
    """The tuned reference and pocketgpt at one seed: side by side (jobs >= 2), else in turn."""
    names = ["bare", "pocketgpt"] if k % 2 == 0 else ["pocketgpt", "bare"]
    kw = {"seed": seed, "eval_every": args.eval_every}
    if args.jobs >= 2:
        futures = {
            n: pool.submit(run_worker, n, args, **kw, lr=lr if n == "bare" else None) for n in names
        }
        return {n: f.result() for n, f in futures.items()}
    return {n: run_worker(n, args, **kw, lr=lr if n == "bare" else None) for n in names}


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}x, range {min(values):.2f}-{max(values):.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="training steps of every run")
    ap.add_argument("--eval-every", type=int, default=25, help="in the seeded comparison")
    ap.add_argument("--sweep-eval-every", type=int, default=100, help="in the reference's sweep")
    ap.add_argument(
        "--ref-lrs",
        type=float,
        nargs="+",
        default=[1e-3, 2e-3, 3e-3, 6e-3],
        help="the reference's peak learning rates to sweep (one: no sweep)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2], help="processes at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument(
        "--eval-batches",
        type=int,
        default=None,
        help="validation batches of 16 x 128 per evaluation (default: the whole split)",
    )
    ap.add_argument("--override", action="append", default=[], help="pocketgpt Hydra override")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1337, help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, default=1e-3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        fn = {"bare": worker_bare, "pocketgpt": worker_pocketgpt}[args.worker]
        Path(args.json).write_text(json.dumps(fn(args)))
        return 0

    import _report

    loads = [f"before: {_report.load_average()}"]
    print(f"load average {loads[0]}", flush=True)
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    sweep_table = ""
    if len(args.ref_lrs) > 1:
        lr, sweep_table = sweep_reference(args, pool)
        loads.append(f"after the sweep: {_report.load_average()}")
        print(sweep_table, flush=True)
    else:
        lr = args.ref_lrs[0]

    per_seed = []
    for k, seed in enumerate(args.seeds):
        res = compare_seed(args, pool, lr, seed, k)
        bare, ours = res["bare"]["curve"], res["pocketgpt"]["curve"]
        target = bare[-1]["bpb"]
        our_time, our_step = time_to(ours, target)
        ratio = our_time / bare[-1]["time"] if our_time is not None else None
        per_seed.append(
            {"seed": seed, "bare": bare, "ours": ours, "target": target, "ratio": ratio}
            | {"our_time": our_time, "our_step": our_step, "chose": res["pocketgpt"]["chose"]}
        )
        loads.append(f"after seed {seed}: {_report.load_average()}")
        print(
            f"seed {seed}: reference {target:.4f} after {bare[-1]['time']:.1f} s; pocketgpt "
            + (f"there at step {our_step}, {our_time:.1f} s: {ratio:.2f}x" if ratio else "never")
            + f", final {ours[-1]['bpb']:.4f} after {ours[-1]['time']:.1f} s",
            flush=True,
        )
    pool.shutdown()

    rows = []
    for r in per_seed:
        b, o = r["bare"][-1], r["ours"][-1]
        rows.append(
            [
                r["seed"],
                f"{r['target']:.4f}",
                f"{b['time']:.1f}",
                f"{b['time'] / b['step'] * 1000:.0f}",
                f"{r['our_time']:.1f} (step {r['our_step']})" if r["ratio"] else "not reached",
                f"{o['bpb']:.4f}",
                f"{o['time'] / o['step'] * 1000:.0f}",
                f"**{r['ratio']:.2f}x**" if r["ratio"] else "not reached",
            ]
        )
    table = _report.table(
        [
            "seed",
            f"reference's final bpb (lr {lr:g})",
            "reference s",
            "ms/step",
            "pocketgpt s to it",
            "pocketgpt final bpb",
            "ms/step",
            "time ratio",
        ],
        rows,
    )
    ratios = [r["ratio"] for r in per_seed if r["ratio"] is not None]
    met = len(ratios) == len(per_seed) and max(ratios) <= TARGET
    verdict = (
        f"{spread(ratios)} over {len(ratios)} of {len(per_seed)} seeds"
        if ratios
        else "never reached"
    )
    # Median curves over the seeds: both contenders evaluated at the same steps.
    curve_rows = []
    for p in per_seed[0]["ours"]:
        s = p["step"]
        got = {
            side: [q for r in per_seed if (q := at_step(r[side], s))] for side in ("ours", "bare")
        }
        cells = [s]
        for side in ("ours", "bare"):
            pts = got[side] if len(got[side]) == len(per_seed) else []
            cells += [
                f"{statistics.median(q['time'] for q in pts):.0f}" if pts else "",
                f"{statistics.median(q['bpb'] for q in pts):.4f}" if pts else "",
            ]
        curve_rows.append(cells)
    curves = _report.table(
        ["step", "pocketgpt s", "pocketgpt bpb", "reference s", "reference bpb"], curve_rows
    )
    how = (
        "side by side (2 processes at once)"
        if args.jobs >= 2
        else "one after the other, alternating"
    )
    notes = [
        f"- time ratio pocketgpt / tuned reference to the reference's final bpb, per seed: "
        f"**{verdict}** (target: at most {TARGET}x on every seed: "
        f"{'met' if met else 'not met'})",
        "- the reference's lr: "
        + (
            f"{lr:g}, the best final bpb of {', '.join(f'{x:g}' for x in args.ref_lrs)} "
            f"at seed {args.seeds[0]}"
            if sweep_table
            else f"{lr:g} (given, no sweep)"
        )
        + f"; min_lr = lr / 10; warm-up {round(100 * min(1.0, args.steps / 600))} steps "
        f"(nanoGPT's 100 of 600, scaled to the budget); {args.steps} steps for every run",
        f"- pocketgpt overrides: `{' '.join(args.override) or '(none: the default recipe)'}`; "
        f"evaluation every {args.eval_every} steps (sweep: every {args.sweep_eval_every}) on "
        + (
            f"the first {args.eval_batches} validation batches of 16 x 128"
            if args.eval_batches
            else "the whole validation split"
        )
        + f", its time left out of both clocks; {args.threads} torch thread(s) per process; "
        f"each seed's two runs {how}",
        f"- log: `{per_seed[0]['chose']}`",
        f"- load average {'; '.join(loads)}; after: {_report.load_average()}",
    ]
    print(table)
    print(curves)
    print("\n".join(notes))
    if not args.no_write:
        head = _report.header(
            f"pocketgpt vs the lr-tuned reference, {args.steps} steps, {len(args.seeds)} seeds",
            argv,
        )
        parts = [table, "", *notes]
        if sweep_table:
            parts += ["", "The reference's learning-rate sweep (validation bpb):", "", sweep_table]
        parts += ["", "Validation curves (medians over the seeds):", "", curves]
        _report.append_section(SECTION, head + "\n" + "\n".join(parts))
        if not args.override and ratios:
            _report.set_summary(
                "(e)",
                f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x, "
                f"{len(per_seed)} seeds, {args.steps} steps) the lr-tuned reference's time to its "
                "final bpb",
                "yes" if met else "no",
            )
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
