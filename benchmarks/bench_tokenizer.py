"""Tokenizer benchmark: training time and encode throughput, ours vs `tokenizers` vs tiktoken.

    .venv/bin/python benchmarks/bench_tokenizer.py                 # WikiText-2 valid+test, vocab 8192
    .venv/bin/python benchmarks/bench_tokenizer.py --repeats 5 --pattern gpt4

Data: ``wiki.valid.raw`` + ``wiki.test.raw`` from ``--data-dir`` (default: ``../shared/data/
wikitext-2-raw`` next to the repo root). Each number is the median of ``--repeats`` runs.

* train: ``BPETokenizer.train`` vs ``tokenizers``' ``BpeTrainer`` with the same pre-tokenization
  (our regex, then bytes), vocab size and special tokens, both on the text's lines.
* encode: every line of the text (``encode_batch``), all with the *same* vocabulary and merges:
  ours (cold: empty per-piece cache; warm: cache filled by a previous run), ``tokenizers``
  loading our ``save_hf`` export (``encode_batch``, its own thread pool), and tiktoken built from
  the same ranks (``encode_ordinary_batch``, threads; and one thread, a plain loop).

Appends a dated section to BENCHMARKS.md's tokenizer section (``--no-write`` to skip).
Imports no torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pocketgpt.tokenizer import PATTERNS, BPETokenizer, HFTokenizer

ROOT = Path(__file__).resolve().parents[1]


def median_time(fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None):
    """(median seconds, last result) of ``fn`` over ``repeats`` runs; ``setup`` runs untimed."""
    times, result = [], None
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT / "../shared/data/wikitext-2-raw"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--pattern", default="gpt2", choices=sorted(PATTERNS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only; do not append results")
    args = ap.parse_args(argv)

    data_dir = Path(args.data_dir)
    files = [data_dir / "wiki.valid.raw", data_dir / "wiki.test.raw"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"bench_tokenizer: missing data file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    lines = text.splitlines(keepends=True)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"data: {mb:.2f} MB, {len(lines):,} lines; vocab {args.vocab_size}, {args.pattern}")

    rows: list[tuple[str, str, str]] = []  # (what, time, rate)

    # --- training ------------------------------------------------------------------------------
    def train_ours() -> BPETokenizer:
        tok = BPETokenizer(vocab_size=args.vocab_size, pattern=args.pattern)
        tok.train(lines)
        return tok

    def train_hf() -> HFTokenizer:
        tok = HFTokenizer(vocab_size=args.vocab_size, pattern=args.pattern)
        tok.train(lines)
        return tok

    t_ours, ours = median_time(train_ours, args.repeats)
    t_hf, _ = median_time(train_hf, args.repeats)
    rows.append(("train: ours (BPETokenizer)", f"{t_ours:.2f} s", f"{t_ours / t_hf:.2f}x HF"))
    rows.append(("train: tokenizers BpeTrainer", f"{t_hf:.2f} s", "1.00x"))

    # --- encoding ------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        hf_path = Path(tmp) / "tokenizer.json"
        ours.save_hf(hf_path)
        import tokenizers

        hf = tokenizers.Tokenizer.from_file(str(hf_path))

    def rate(seconds: float, n_tokens: int) -> str:
        return f"{mb / seconds:.2f} MB/s, {n_tokens / seconds / 1e6:.2f} M tok/s"

    t_cold, ids = median_time(lambda: ours.encode_batch(lines), args.repeats, ours.clear_cache)
    n_tok = sum(map(len, ids))
    t_warm, _ = median_time(lambda: ours.encode_batch(lines), args.repeats)
    t_hf_enc, hf_enc = median_time(
        lambda: hf.encode_batch(lines, add_special_tokens=False), args.repeats
    )
    hf_ids = [e.ids for e in hf_enc]
    rows.append(("encode: ours, cold cache", f"{t_cold:.2f} s", rate(t_cold, n_tok)))
    rows.append(("encode: ours, warm cache", f"{t_warm:.2f} s", rate(t_warm, n_tok)))
    rows.append(("encode: tokenizers encode_batch", f"{t_hf_enc:.2f} s", rate(t_hf_enc, n_tok)))
    same_hf = hf_ids == ids

    tiktoken_note = "tiktoken not installed"
    try:
        import tiktoken
    except ImportError:
        tiktoken = None
    if tiktoken is not None:
        ranks = {ours.token_bytes(i): i for i in range(len(ours.special_tokens), ours.vocab_size)}
        enc = tiktoken.Encoding(
            name=f"pocketgpt-{args.pattern}-{args.vocab_size}",
            pat_str=PATTERNS[args.pattern],
            mergeable_ranks=ranks,
            special_tokens={t: i for i, t in enumerate(ours.special_tokens)},
        )
        t_tt, tt_ids = median_time(lambda: enc.encode_ordinary_batch(lines), args.repeats)
        t_tt1, _ = median_time(lambda: [enc.encode_ordinary(s) for s in lines], args.repeats)
        rows.append(("encode: tiktoken encode_ordinary_batch", f"{t_tt:.2f} s", rate(t_tt, n_tok)))
        rows.append(("encode: tiktoken, one thread", f"{t_tt1:.2f} s", rate(t_tt1, n_tok)))
        same_tt = sum(a == b for a, b in zip(tt_ids, ids, strict=True))
        tiktoken_note = f"tiktoken ids equal to ours on {same_tt}/{len(lines)} lines"

    ratios = (
        f"ours/tokenizers encode speed: cold {t_hf_enc / t_cold:.2f}x, warm "
        f"{t_hf_enc / t_warm:.2f}x; train time ours/tokenizers {t_ours / t_hf:.2f}x"
    )
    checks = (
        f"ids: tokenizers (our export) {'identical' if same_hf else 'DIFFERENT'} on all "
        f"{len(lines)} lines; {tiktoken_note}; {n_tok:,} tokens"
    )

    width = max(len(r[0]) for r in rows)
    table = [f"| {'what':<{width}} | time (median) | rate |", f"|{'-' * (width + 2)}|---|---|"]
    table += [f"| {w:<{width}} | {t} | {r} |" for w, t, r in rows]
    print("\n".join(table))
    print(ratios)
    print(checks)

    if not args.no_write:
        machine = (
            f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs "
            f"({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} "
            f"usable), Python {platform.python_version()}, load average before the run "
            f"{load_before} (a shared machine: other work competes for the cores)"
        )
        versions = ", ".join(
            f"{p} {version(p)}" for p in ("tokenizers", "tiktoken", "regex", "transformers")
        )
        command = "python benchmarks/bench_tokenizer.py " + " ".join(argv or sys.argv[1:])
        section = [
            f"### {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}: {args.pattern}, vocab "
            f"{args.vocab_size}, median of {args.repeats}",
            "",
            f"- command: `{command.strip()}`",
            f"- machine: {machine}",
            f"- packages: {versions}",
            f"- data: WikiText-2 raw valid + test, {mb:.2f} MB, {len(lines):,} lines",
            "",
            *table,
            "",
            f"- {ratios}",
            f"- {checks}",
            "",
        ]
        results = Path(args.results)
        import _report  # the shared BENCHMARKS.md helper: under the tokenizer's heading

        _report.append_section("(b) Tokenizer", "\n".join(section), results)
        print(f"appended to {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
