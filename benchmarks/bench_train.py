"""Training throughput: pocketgpt's full training step vs a bare nanoGPT-style loop vs transformers.

    python benchmarks/bench_train.py                    # default shape, 3 repeats
    python benchmarks/bench_train.py --ablations        # + what each optimization buys
    python benchmarks/bench_train.py --profile          # + torch.profiler top ops, both loops

Contenders, at the same shape (GPTMini default: vocab 8192, d_model 128, 4 heads, d_ff 512,
4 layers, context 128; batch 16 x 128 tokens), on the same tokens (the embedded corpus through
pocketgpt's tokenizer, memmapped):

- **pocketgpt**: ``pocketgpt.train.train`` exactly as ``python -m pocketgpt.train`` runs it
  (Hydra config, MLflow tracking to a SQLite store, progress bar, checkpoints every 100 steps,
  evaluation only at the end); tokens/s is read back from the run's ``tokens_per_sec`` metric,
  whose windows run from log step to log step and so include tracking, the bar and checkpoints;
- **bare**: ``benchmarks/nanogpt_ref.py``, a nanoGPT-style model and loop;
- **bare+malloc**: the same loop with pocketgpt's allocator settings
  (``pocketgpt.runtime.tune_cpu_allocator``: glibc keeps freed pages instead of unmapping them
  after every step), so that the allocator's share of pocketgpt's lead shows apart from the rest;
- **transformers**: ``GPT2LMHeadModel`` (sdpa attention) at the same shape in the same loop as
  the bare reference, its loss computed by transformers (``labels`` with ``shift_labels``).

Each contender runs in a fresh process (no allocator or thread-pool state shared), ``--warmup``
steps then ``--steps`` timed steps; the repeats interleave the contenders (rotating their order)
and the table shows medians. The matmul peak is a 2048x2048 fp32 ``torch.mm`` timed in the same
run. Model FLOPs per token (nanoGPT's estimate, the PaLM appendix formula):
``6 * N + 12 * L * T * d``, N = parameters without the position table (the tied head counted
once, so its 2*d*V forward FLOPs per token are in 6N), L layers, T context, d width.

Appends a dated section to BENCHMARKS.md (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SECTION = "(a) Training throughput"
SHAPES = {
    "gpt_mini": dict(d_model=128, n_heads=4, d_ff=512, num_layers=4, max_len=128),
    "gpt_small": dict(d_model=256, n_heads=8, d_ff=1024, num_layers=6, max_len=256),
}
BATCH = 16


# --------------------------------------------------------------------------- shared helpers


def token_files(vocab_size: int = 8192, cache_dir: Path = ROOT / ".cache/pocketgpt") -> dict:
    """The embedded corpus through pocketgpt's (cached) tokenizer: paths of the token arrays."""
    from pocketgpt.config import DataConfig, TokenizerConfig
    from pocketgpt.data import load_corpus, tokenize_corpus
    from pocketgpt.tokenizer import build_tokenizer

    corpus = load_corpus(DataConfig(), cache_dir)
    tok, _ = build_tokenizer(TokenizerConfig(vocab_size=vocab_size), corpus.train, cache_dir)
    splits = tokenize_corpus(corpus, tok, cache_dir)
    return {
        "train": str(splits["train"].tokens.filename),
        "validation": str(splits["validation"].tokens.filename),
        "vocab_size": tok.vocab_size,
        "train_tokens": len(splits["train"].tokens),
    }


def flops_per_token(shape: dict, vocab: int, block: int) -> int:
    """6 N + 12 L T d, N = non-embedding parameters incl. the tied head (GPTMini.num_params)."""
    from pocketgpt.config import ModelConfig
    from pocketgpt.model import GPTMini

    n = GPTMini(ModelConfig(vocab_size=vocab, **shape)).num_params()
    return 6 * n + 12 * shape["num_layers"] * block * shape["d_model"]


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Median GFLOP/s of an n x n fp32 matmul (after 3 warm-up calls)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------- workers


def worker_pocketgpt(args, files) -> dict:
    """The whole job as ``python -m pocketgpt.train`` runs it; rate from MLflow's metric."""
    import _compose
    from mlflow.tracking import MlflowClient

    overrides = [
        f"model={args.model}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.eval_interval=1000000",  # evaluation only after the last step
        "trainer.log_interval=10",
        "tracking.log_model=false",
        "trainer.sample_tokens=1",
        *([f"trainer.threads={args.threads}"] if args.threads else []),
        *args.override,
    ]
    job = _compose.train_in_temp("bench-train-", overrides)
    client = MlflowClient(job.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pocketgpt").experiment_id])
    windows = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "tokens_per_sec")
    }
    timed = [(s, v) for s, v in sorted(windows.items()) if s > args.warmup]
    seconds = sum(10 * BATCH * args.block / v for _, v in timed)
    return {
        "tokens_per_sec": len(timed) * 10 * BATCH * args.block / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "chose": job.chose,
    }


def _timed_loop(step, get_batch, warmup: int, steps: int) -> float:
    """tokens/s over ``steps`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(*get_batch())
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*get_batch())
    return steps * BATCH * get_batch.block / (time.perf_counter() - t0)


def worker_bare(args, files, malloc: bool = False) -> dict:
    """The nanoGPT-style loop; ``malloc``: with pocketgpt's allocator settings
    (``runtime.tune_cpu_allocator``, which every pocketgpt training job applies on the CPU), so
    that the table shows the allocator's share of pocketgpt's lead apart from the rest."""
    import nanogpt_ref as ref
    import torch

    if malloc:
        from pocketgpt.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    torch.manual_seed(1337)
    shape = SHAPES[args.model]
    model = ref.GPT(
        ref.RefConfig(
            vocab_size=files["vocab_size"],
            block_size=shape["max_len"],
            n_layer=shape["num_layers"],
            n_head=shape["n_heads"],
            n_embd=shape["d_model"],
            n_inner=shape["d_ff"],
        )
    )
    stamps: dict[int, float] = {}
    ref.train(
        model,
        files["train"],
        args.warmup + args.steps,
        ref.RefRecipe(batch_size=BATCH),
        on_log=lambda it, loss, t: stamps.__setitem__(it, t),
    )
    seconds = stamps[args.warmup + args.steps] - stamps[args.warmup]
    return {
        "tokens_per_sec": args.steps * BATCH * args.block / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_hf(args, files) -> dict:
    import nanogpt_ref as ref
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1337)
    shape = SHAPES[args.model]
    cfg = GPT2Config(
        vocab_size=files["vocab_size"],
        n_positions=shape["max_len"],
        n_embd=shape["d_model"],
        n_layer=shape["num_layers"],
        n_head=shape["n_heads"],
        n_inner=shape["d_ff"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.99),
    )
    offset = ref.npy_data_offset(files["train"])

    def get_batch():
        return ref.get_batch(files["train"], args.block, BATCH, offset)

    get_batch.block = args.block

    def step(x, y):
        loss = model(input_ids=x, labels=x, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rate = _timed_loop(step, get_batch, args.warmup, args.steps)
    return {"tokens_per_sec": rate, "peak_rss_mb": peak_rss_mb()}


# Ablations: one training step of a bare model loop, varying one thing at a time.
ABLATIONS = {
    "bare reference (nanoGPT style, AdamW default = for-loop)": "model=bare,opt=loop",
    "bare reference + glibc malloc keeping pages": "model=bare,opt=loop,malloc=on",
    "GPTMini, F.cross_entropy, fused AdamW (before this issue)": "ce=plain,opt=fused",
    "GPTMini, F.cross_entropy + malloc": "ce=plain,opt=fused,malloc=on",
    "GPTMini, fused head+CE": "ce=fused,opt=fused",
    "GPTMini, fused head+CE + malloc": "ce=fused,opt=fused,malloc=on",
    "GPTMini, lm_loss (no logits) + malloc (pocketgpt now)": "ce=loss,opt=fused,malloc=on",
    "  same, AdamW foreach": "ce=loss,opt=foreach,malloc=on",
    "  same, AdamW for-loop": "ce=loss,opt=loop,malloc=on",
    "  same, CE chunk 128 rows": "ce=loss,opt=fused,malloc=on,chunk=128",
    "  same, CE chunk 256 rows": "ce=loss,opt=fused,malloc=on,chunk=256",
    "  same, CE chunk 1024 rows": "ce=loss,opt=fused,malloc=on,chunk=1024",
    "  same, 1 thread": "ce=loss,opt=fused,malloc=on,threads=1",
    "  same, autocast bf16 (plain CE)": "ce=loss,opt=fused,malloc=on,precision=bf16",
    "  same, torch.compile (default mode)": "ce=fused,opt=fused,malloc=on,compile=on",
}


def parse_spec(spec: str) -> dict:
    out = {
        "model": "gptmini",
        "ce": "fused",
        "opt": "fused",
        "malloc": "off",
        "chunk": "512",
        "threads": "",
        "precision": "fp32",
        "compile": "off",
    }
    for part in filter(None, spec.split(",")):
        k, v = part.split("=")
        out[k] = v
    return out


def _build_variant(spec: dict, files: dict, model_name: str, block: int):
    """(step function, params) of one ablation variant, built from a parsed spec."""
    import nanogpt_ref as ref
    import torch
    import torch.nn.functional as F

    from pocketgpt import fused_loss
    from pocketgpt.config import ModelConfig
    from pocketgpt.model import GPTMini

    torch.manual_seed(1337)
    shape = SHAPES[model_name]
    if spec["model"] == "bare":
        model = ref.GPT(
            ref.RefConfig(
                vocab_size=files["vocab_size"],
                block_size=shape["max_len"],
                n_layer=shape["num_layers"],
                n_head=shape["n_heads"],
                n_embd=shape["d_model"],
                n_inner=shape["d_ff"],
            )
        )
    else:
        model = GPTMini(ModelConfig(vocab_size=files["vocab_size"], **shape))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {}}[spec["opt"]]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), **kw)
    fwd = torch.compile(model) if spec["compile"] == "on" else model
    offset = ref.npy_data_offset(files["train"])
    bf16 = spec["precision"] == "bf16"

    chunk = int(spec["chunk"])

    def head_and_loss(x, y):
        """The fused head + cross-entropy that still makes the logits (as a forward that returns
        them would), where it applies; else the plain head and F.cross_entropy."""
        h = model.hidden_states(x)
        h, t = h.reshape(-1, h.size(-1)), y.reshape(-1)
        if fused_loss.fused_ok(h, t):
            return fused_loss.linear_cross_entropy(h, model.lm_head.weight, t, chunk=chunk)[0]
        return F.cross_entropy(model.lm_head(h).float(), t)

    def loss_of(x, y):
        if spec["ce"] == "loss":
            return fused_loss.lm_loss(model, x, y, chunk)  # what pocketgpt's trainer runs
        if spec["ce"] == "fused" and spec["model"] != "bare" and spec["compile"] != "on":
            return head_and_loss(x, y)
        return fwd(x, y)[1]  # the model's forward: plain cross-entropy over its logits

    def step():
        # The thread count is process-wide in torch: set before every step, so that variants can
        # be interleaved in one process.
        torch.set_num_threads(int(spec["threads"] or default_threads))
        x, y = ref.get_batch(files["train"], block, BATCH, offset)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    default_threads = torch.get_num_threads()
    return step


def worker_step(args, files) -> dict:
    """Step times of one or more variants (``--spec``, ';'-separated) interleaved step by step
    in this process, so that other load on the machine hits them alike; ``malloc`` is
    process-wide, so it is taken from the first spec. Optionally a profile of the first."""
    import torch

    specs = [parse_spec(x) for x in args.spec.split(";")]
    if specs[0]["malloc"] == "on":
        from pocketgpt.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    steps, firsts = [], []
    for spec in specs:
        step = _build_variant(spec, files, args.model, args.block)
        t0 = time.perf_counter()
        step()
        firsts.append(time.perf_counter() - t0)
        steps.append(step)
    slow = any(s["precision"] == "bf16" for s in specs)
    for _ in range(1 if slow else 2):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in specs]
    for i in range(2 if slow else args.steps):
        order = list(range(len(specs)))
        order = order[i % len(order) :] + order[: i % len(order)]
        for k in order:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    torch.set_num_threads(torch.get_num_threads())
    out = {
        "variants": [
            {
                "tokens_per_sec": BATCH * args.block / statistics.median(t),
                "best_tokens_per_sec": BATCH * args.block / min(t),
                "first_step_s": f,
            }
            for t, f in zip(times, firsts, strict=True)
        ],
        "peak_rss_mb": peak_rss_mb(),
    }
    out.update(out["variants"][0])
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        n = 5
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(n):
                steps[0]()
        events = prof.key_averages(group_by_input_shape=True)
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
        out["profile"] = [
            {
                "op": e.key,
                "shapes": str(e.input_shapes)[:60],
                "ms_per_step": e.self_cpu_time_total / n / 1000,
                "share": e.self_cpu_time_total / total,
                "calls_per_step": e.count / n,
            }
            for e in top
        ]
        out["profile_total_ms"] = total / n / 1000
    return out


WORKERS = {
    "pocketgpt": worker_pocketgpt,
    "bare": worker_bare,
    "bare+malloc": lambda args, files: worker_bare(args, files, malloc=True),
    "transformers": worker_hf,
    "step": worker_step,
}


def run_worker(name: str, args, extra: list[str] | None = None) -> dict:
    import _report

    argv = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += [a for o in args.override for a in ("--override", o)]
    return _report.run_worker(__file__, name, [*argv, *(extra or [])])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gpt_mini", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run (multiple of 10)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (multiple of 10)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--contenders", nargs="*", default=["pocketgpt", "bare", "bare+malloc", "transformers"]
    )
    ap.add_argument("--ablations", action="store_true", help="time each optimization alone")
    ap.add_argument("--ablation-steps", type=int, default=15)
    ap.add_argument("--only", nargs="*", default=None, help="ablations whose name has this text")
    ap.add_argument("--profile", action="store_true", help="torch.profiler: bare vs pocketgpt")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.block = SHAPES[args.model]["max_len"]

    if args.threads:  # the workers and the matmul peak alike
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        files = token_files()
        result = WORKERS[args.worker](args, files)
        Path(args.json).write_text(json.dumps(result))
        return 0

    import _report

    files = token_files()
    fpt = flops_per_token(SHAPES[args.model], files["vocab_size"], args.block)
    load_before = _report.load_average()
    print(f"load average before: {load_before}; model FLOPs/token {fpt:,}")
    results: dict[str, list[dict]] = {c: [] for c in args.contenders}
    peaks: list[float] = []
    for r in range(args.repeats if args.contenders else 0):
        k = r % len(args.contenders)
        order = args.contenders[k:] + args.contenders[:k]
        peaks.append(matmul_gflops())
        for name in order:
            res = run_worker(name, args)
            results[name].append(res)
            print(f"repeat {r + 1}: {name}: {res['tokens_per_sec']:,.0f} tokens/s", flush=True)
        peaks.append(matmul_gflops())
    if args.ablations:
        peaks.append(matmul_gflops())
    peak = statistics.median(peaks) if peaks else matmul_gflops()
    base = (
        statistics.median(x["tokens_per_sec"] for x in results.get("bare", []))
        if "bare" in results
        else None
    )
    rows = []
    summary = {}

    def paired(runs: list[dict]) -> str:
        """Median and range of the per-repeat ratios to bare: each repeat's contenders ran
        back to back, so a ratio within a repeat shares that minute's load."""
        r = [x["tokens_per_sec"] / b["tokens_per_sec"] for x, b in zip(runs, results["bare"])]
        return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"

    for name, runs in results.items():
        rate = statistics.median(x["tokens_per_sec"] for x in runs)
        gflops = rate * fpt / 1e9
        summary[name] = rate
        rows.append(
            [
                name,
                f"{rate:,.0f}",
                " / ".join(f"{x['tokens_per_sec']:,.0f}" for x in runs),
                f"{gflops:.1f}",
                f"{gflops / peak:.0%}",
                f"{rate / base:.2f}x" if base else "",
                paired(runs) if base else "",
                f"{statistics.median(x['peak_rss_mb'] for x in runs):.0f}",
            ]
        )
    headers = [
        "contender",
        "tokens/s (median)",
        "runs",
        "model GFLOP/s",
        "of matmul peak",
        "vs bare",
        "vs bare per repeat (median, range)",
        "peak RSS MB",
    ]
    table = _report.table(headers, rows) if rows else "(no contenders run)"
    chose = next((x.get("chose") for x in results.get("pocketgpt", []) if x.get("chose")), "")
    notes = [
        f"- matmul peak (2048² fp32 `torch.mm`, median of {len(peaks)} in this run): "
        f"{peak:.1f} GFLOP/s (runs: {', '.join(f'{p:.0f}' for p in peaks)})",
        f"- model FLOPs/token = 6N + 12LTd = {fpt:,} ({args.model}, vocab "
        f"{files['vocab_size']}, batch {BATCH} x {args.block}); {args.steps} timed steps after "
        f"{args.warmup} warm-up steps per run, {args.repeats} repeats interleaved",
        f"- load average before: {load_before}; after: {_report.load_average()}",
    ]
    if chose:
        notes.append(f"- pocketgpt's log: `{chose}`")
    print(table)
    print("\n".join(notes))

    sections = [table, "", *notes]
    if args.ablations or args.profile:
        abl_rows, profiles = [], {}
        names = [n for n in ABLATIONS if not args.only or any(o in n for o in args.only)]
        extra = ["--steps", str(args.ablation_steps)]
        if args.ablations:
            runs: dict[str, list[dict]] = {n: [] for n in names}
            for r in range(args.repeats):
                for name in names if r % 2 == 0 else names[::-1]:
                    res = run_worker("step", args, ["--spec", ABLATIONS[name], *extra])
                    runs[name].append(res)
                    print(
                        f"ablation {name}: {res['tokens_per_sec']:,.0f} tokens/s (median), "
                        f"{res['best_tokens_per_sec']:,.0f} (best step)",
                        flush=True,
                    )
                peaks.append(matmul_gflops())
            ref_rate = statistics.median(x["tokens_per_sec"] for x in runs[names[0]])
            for name in names:
                rate = statistics.median(x["tokens_per_sec"] for x in runs[name])
                abl_rows.append(
                    [
                        name.strip(),
                        f"`{ABLATIONS[name]}`",
                        f"{rate:,.0f}",
                        f"{rate * fpt / 1e9 / peak:.0%}",
                        f"{rate / ref_rate:.2f}x",
                        f"{statistics.median(x['first_step_s'] for x in runs[name]):.1f}",
                        f"{statistics.median(x['peak_rss_mb'] for x in runs[name]):.0f}",
                    ]
                )
            abl = _report.table(
                [
                    "step variant",
                    "spec",
                    "tokens/s",
                    "of peak",
                    "vs first row",
                    "first step s",
                    "peak RSS MB",
                ],
                abl_rows,
            )
            print(abl)
            sections += [
                "",
                f"Ablations (one training step in a bare loop, fresh process each, median of "
                f"{args.ablation_steps} steps, {args.repeats} runs; bf16 times 2 steps):",
                "",
                abl,
            ]
        if args.profile:
            for label, spec in (
                ("bare reference", ABLATIONS[names[0]] if names else "model=bare,opt=loop"),
                ("pocketgpt model step", "ce=loss,opt=fused,malloc=on"),
            ):
                res = run_worker(
                    "step", args, ["--spec", spec, "--profile", "--top", str(args.top)]
                )
                profiles[label] = res
                prows = [
                    [
                        p["op"],
                        p["shapes"].replace("|", "/"),
                        f"{p['calls_per_step']:.0f}",
                        f"{p['ms_per_step']:.1f}",
                        f"{p['share']:.0%}",
                    ]
                    for p in res["profile"]
                ]
                ptable = _report.table(["op", "input shapes", "calls", "ms/step", "share"], prows)
                print(f"\n{label}: {res['profile_total_ms']:.0f} ms/step (self CPU)\n{ptable}")
                sections += [
                    "",
                    f"torch.profiler, {label} (`{spec}`): {res['profile_total_ms']:.0f} ms of self "
                    f"CPU time per step; top ops:",
                    "",
                    ptable,
                ]
    if not args.no_write:
        head = _report.header(
            f"{args.model}, batch {BATCH} x {args.block}, median of {args.repeats}", argv
        )
        _report.append_section(SECTION, head + "\n" + "\n".join(sections))
        if "pocketgpt" in summary and base:
            ratio = summary["pocketgpt"] / base
            share = summary["pocketgpt"] * fpt / 1e9 / peak
            _report.set_summary(
                "(a)",
                f"{ratio:.2f}x bare, {share:.0%} of matmul peak ({summary['pocketgpt']:,.0f} vs "
                f"{base:,.0f} tokens/s; transformers {summary.get('transformers', 0) / base:.2f}x)",
                "yes" if ratio >= 1.2 and share >= 0.55 else "no",
            )
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
