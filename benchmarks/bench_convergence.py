"""Time to a validation bits-per-byte on the embedded corpus: pocketgpt's default recipe vs the
bare nanoGPT-style reference with its own recipe.

    python benchmarks/bench_convergence.py                 # bare 600 iterations, then pocketgpt
    python benchmarks/bench_convergence.py --override optim.lr=2e-3   # try another recipe

1. The bare reference (``benchmarks/nanogpt_ref.py``: nanoGPT's small-model recipe, lr 1e-3 to
   1e-4 cosine, 100 warm-up iterations, betas (0.9, 0.99), weight decay 0.1, clip 1.0, batch
   16 x 128, random windows) trains for ``--steps`` iterations (default 600, what ``make
   train`` runs). Its final validation bpb is the target.
2. pocketgpt trains with its default recipe (``python -m pocketgpt.train`` as is: Hydra config,
   MLflow tracking, checkpoints), evaluated every ``--eval-every`` steps; the time to the target
   is the training time at the first evaluation at or below it.

Both use the same tokens (the embedded corpus through pocketgpt's tokenizer) and the same
evaluation (``pocketgpt.evaluation.evaluate`` over the whole validation split, bits per byte);
evaluation time is left out of both clocks (it is the measuring instrument; its cost in a
default run is in section (d)). Each runs in a fresh process. Target: pocketgpt reaches the
reference's final bpb in at most 0.8x the reference's time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SECTION = "(e) Time to a validation bpb"


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

    tok, splits = _splits()
    torch.manual_seed(1337)
    model = ref.GPT(ref.RefConfig(vocab_size=tok.vocab_size))
    curve = []
    state = {"eval": 0.0}
    t_start = time.perf_counter()

    def on_eval(it: int) -> None:
        t0 = time.perf_counter()
        res = evaluate(model, splits["validation"], 128, 16, torch.device("cpu"))
        model.train()
        curve.append({"step": it, "time": t0 - t_start - state["eval"], "bpb": res.bpb})
        state["eval"] += time.perf_counter() - t0

    ref.train(
        model,
        str(splits["train"].tokens.filename),
        args.steps,
        ref.RefRecipe(),
        on_eval=on_eval,
        eval_interval=args.eval_every,
    )
    if curve[-1]["step"] != args.steps:
        on_eval(args.steps)
    return {"curve": curve}


def worker_pocketgpt(args) -> dict:
    import _compose

    overrides = [
        f"trainer.eval_interval={args.eval_every}",
        "tracking.log_model=false",
        *args.override,
    ]
    job = _compose.train_in_temp("bench-convergence-", overrides)
    # Each validation pass of fit(): its step, and the training time before it with the
    # evaluations left out (TrainResult.evals).
    curve = [
        {"step": e["step"], "time": e["train_seconds"], "bpb": e["bpb"]}
        for e in job.outcome.result.evals
    ]
    return {"curve": curve, "chose": job.chose, "max_steps": job.cfg.trainer.max_steps}


def run_worker(name: str, args) -> dict:
    import _report

    argv = ["--steps", str(args.steps), "--eval-every", str(args.eval_every)]
    return _report.run_worker(
        __file__, name, argv + [a for o in args.override for a in ("--override", o)]
    )


def time_to(curve: list[dict], target: float) -> tuple[float | None, int | None]:
    """(training seconds, step) at the first evaluation at or below target."""
    for point in curve:
        if point["bpb"] <= target + 1e-9:
            return point["time"], point["step"]
    return None, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="iterations of the bare reference")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--override", action="append", default=[], help="pocketgpt Hydra override")
    ap.add_argument("--target", type=float, default=None, help="bpb (default: bare's final)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        fn = {"bare": worker_bare, "pocketgpt": worker_pocketgpt}[args.worker]
        Path(args.json).write_text(json.dumps(fn(args)))
        return 0

    import _report

    load_before = _report.load_average()
    print(f"load average before: {load_before}", flush=True)
    bare = run_worker("bare", args)
    load_mid = _report.load_average()
    bare_final = bare["curve"][-1]
    target = args.target if args.target is not None else bare_final["bpb"]
    # The reference's clock is its whole run (its final bpb is where it ends, even if an earlier
    # evaluation was as low).
    bare_time, bare_step = bare_final["time"], bare_final["step"]
    print(f"bare: final bpb {bare_final['bpb']:.4f} after {bare_final['time']:.1f} s", flush=True)
    ours = run_worker("pocketgpt", args)
    our_time, our_step = time_to(ours["curve"], target)
    our_final = ours["curve"][-1]

    rows = [
        [
            "bare reference (nanoGPT recipe)",
            f"{bare_time:.1f}",
            bare_step,
            f"{bare_final['bpb']:.4f} at step {bare_final['step']}",
            f"{bare_final['time']:.1f}",
            f"{bare_final['time'] / bare_final['step'] * 1000:.0f}",
        ],
        [
            "pocketgpt default recipe",
            f"{our_time:.1f}" if our_time is not None else "not reached",
            our_step if our_step is not None else "",
            f"{our_final['bpb']:.4f} at step {our_final['step']}",
            f"{our_final['time']:.1f}",
            f"{our_final['time'] / our_final['step'] * 1000:.0f}",
        ],
    ]
    table = _report.table(
        [
            "run",
            f"s to bpb {target:.4f}",
            "at step",
            "final val bpb",
            "train s (total)",
            "ms/step",
        ],
        rows,
    )
    ratio = our_time / bare_time if our_time is not None and bare_time else None
    curve_rows = []
    by_step = {p["step"]: p for p in bare["curve"]}
    for p in ours["curve"]:
        b = by_step.get(p["step"])
        curve_rows.append(
            [
                p["step"],
                f"{p['time']:.0f}",
                f"{p['bpb']:.4f}",
                f"{b['time']:.0f}" if b else "",
                f"{b['bpb']:.4f}" if b else "",
            ]
        )
    curves = _report.table(
        ["step", "pocketgpt s", "pocketgpt bpb", "bare s", "bare bpb"], curve_rows
    )
    notes = [
        "- time ratio pocketgpt / bare to the bare reference's final bpb: "
        + (f"**{ratio:.2f}x**" if ratio is not None else "not reached")
        + " (target: at most 0.8x)",
        f"- pocketgpt overrides: `{' '.join(args.override) or '(none: the default recipe)'}`; "
        f"evaluation every {args.eval_every} steps, its time left out of both clocks",
        f"- log: `{ours.get('chose', '')}`",
        f"- load average before: {load_before}; between the runs: {load_mid}; after: "
        f"{_report.load_average()}",
    ]
    print(table)
    print(curves)
    print("\n".join(notes))
    if not args.no_write:
        head = _report.header(f"target = bare reference's bpb after {args.steps} steps", argv)
        body = "\n".join([table, "", *notes, "", "Validation curves:", "", curves])
        _report.append_section(SECTION, head + "\n" + body)
        if not args.override and ratio is not None:
            _report.set_summary(
                "(e)",
                f"{ratio:.2f}x the reference's time to its final bpb {target:.3f} "
                f"({our_time:.0f} s vs {bare_time:.0f} s)",
                "yes" if ratio <= 0.8 else "no",
            )
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
