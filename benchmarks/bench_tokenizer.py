"""Tokenizer benchmark: training time, and cold and warm encode, ours vs `tokenizers` vs tiktoken.

    .venv/bin/python benchmarks/bench_tokenizer.py                 # gpt2 pattern, vocab 8192
    .venv/bin/python benchmarks/bench_tokenizer.py --repeats 7 --pattern gpt4 --no-write

Data (``--data-dir``, default ``../shared/data/wikitext-2-raw`` next to the repo root): both
tokenizers are trained on ``wiki.valid.raw`` and encode ``wiki.test.raw``, text they have not
seen, line by line (``encode_batch``), all with the *same* vocabulary and merges.

* train: ``BPETokenizer.train`` vs ``tokenizers``' ``BpeTrainer`` with the same pre-tokenization
  (our regex, then bytes), vocab size and special tokens, on the validation lines.
* encode: every contender runs in a fresh process per repeat (contenders interleaved, their
  order rotated each repeat): import, load the saved file (ours: ``save``; ``tokenizers``: our
  ``save_hf`` export; tiktoken: built from our ranks), then time the first ``encode_batch`` of
  the test lines (**cold**: nothing cached, every piece new to the tokenizer) and a second call
  on the same lines (**warm**: ours from its per-piece cache). Contenders: ours with the C core,
  ours with the pure-Python reference (``native=False``), ``tokenizers`` ``encode_batch`` and
  ``encode_batch_fast`` (where the installed version has it; no offsets; also with
  ``TOKENIZERS_PARALLELISM=false``, one thread), and tiktoken's ``encode_ordinary_batch``.
  Every contender's ids are checked against ours.

Times are medians over ``--repeats`` with the spread (min-max); ratios are medians of the
per-repeat ratios (each repeat's processes ran back to back, so they share the machine's load).
Appends a dated section to BENCHMARKS.md's tokenizer section (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _report

ROOT = Path(__file__).resolve().parents[1]
# pocketgpt.tokenizer.PATTERNS, spelled out: a worker imports only what its contender needs.
PATTERNS = ("gpt2", "gpt4")

# name -> row label
CONTENDERS = {
    "ours": "ours, C core",
    "ours-python": "ours, pure-Python reference",
    "hf": "tokenizers encode_batch",
    "hf-fast": "tokenizers encode_batch_fast",
    "hf-fast-1t": "tokenizers encode_batch_fast, 1 thread",
    "tiktoken": "tiktoken encode_ordinary_batch",
}


# --- the worker: one contender in a fresh process ------------------------------------------------
def _encoder(name: str, files: dict[str, str]) -> Callable[[list[str]], list[list[int]]]:
    """Load contender ``name`` from its file and return its batch encoder (imports inside: the
    load time includes only what that contender needs)."""
    if name in ("ours", "ours-python"):
        from pocketgpt.tokenizer import BPETokenizer

        tok = BPETokenizer.load(files["ours"])
        if name == "ours-python":
            tok.native = False
        elif not tok.native:
            raise SystemExit("the C core is not built: pip install -e . first")
        return tok.encode_batch
    if name in ("hf", "hf-fast", "hf-fast-1t"):
        if name == "hf-fast-1t":
            # No thread pool: on busy cores, threads can cost more than they give.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        import tokenizers

        hf = tokenizers.Tokenizer.from_file(files["hf"])
        fn = hf.encode_batch if name == "hf" else hf.encode_batch_fast
        return lambda lines: [e.ids for e in fn(lines, add_special_tokens=False)]
    if name == "tiktoken":
        import tiktoken

        from pocketgpt.tokenizer import BPETokenizer

        ours = BPETokenizer.load(files["ours"])
        n = len(ours.special_tokens)
        enc = tiktoken.Encoding(
            name="pocketgpt",
            pat_str=ours.pattern_regex,
            mergeable_ranks={ours.token_bytes(i): i for i in range(n, ours.vocab_size)},
            special_tokens={t: i for i, t in enumerate(ours.special_tokens)},
        )
        return enc.encode_ordinary_batch
    raise ValueError(f"unknown contender {name!r}")


def worker(name: str, files: dict[str, str], data: str, out: Path) -> None:
    lines = Path(data).read_text(encoding="utf-8").splitlines(keepends=True)
    t0 = time.perf_counter()
    encode = _encoder(name, files)
    t1 = time.perf_counter()
    ids = encode(lines)
    t2 = time.perf_counter()
    encode(lines)
    t3 = time.perf_counter()
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    result = {"load": t1 - t0, "cold": t2 - t1, "warm": t3 - t2, "digest": digest}
    result["tokens"] = sum(map(len, ids))
    out.write_text(json.dumps(result))


# --- the parent: train, save, run the workers, report ---------------------------------------------
def available() -> list[str]:
    names = list(CONTENDERS)
    from pocketgpt.tokenizer.bpe import NATIVE_AVAILABLE

    if not NATIVE_AVAILABLE:
        print("the C core is not built (pip install -e .): ours runs the reference only")
        names.remove("ours")
    import tokenizers

    if not hasattr(tokenizers.Tokenizer, "encode_batch_fast"):
        names.remove("hf-fast")
        names.remove("hf-fast-1t")
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        names.remove("tiktoken")
    return names


def version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def median_spread(xs: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT / "../shared/data/wikitext-2-raw"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--pattern", default="gpt2", choices=PATTERNS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", default=str(_report.RESULTS))
    ap.add_argument("--no-write", action="store_true", help="print only; do not append results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(args.files), args.data, Path(args.json))
        return 0

    data_dir = Path(args.data_dir)
    train_file, test_file = data_dir / "wiki.valid.raw", data_dir / "wiki.test.raw"
    missing = [str(f) for f in (train_file, test_file) if not f.is_file()]
    if missing:
        print(f"bench_tokenizer: missing data file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    from pocketgpt.tokenizer import BPETokenizer, HFTokenizer

    load_before = _report.load_average()
    train_lines = train_file.read_text(encoding="utf-8").splitlines(keepends=True)
    test_text = test_file.read_text(encoding="utf-8")
    mb = len(test_text.encode("utf-8")) / 1e6
    n_lines = len(test_text.splitlines())
    print(f"train on {train_file.name}, encode {test_file.name} ({mb:.2f} MB, {n_lines:,} lines)")

    # --- training: interleaved, in this process --------------------------------------------------
    train_times: dict[str, list[float]] = {"ours": [], "hf": []}
    ours = None
    for _ in range(args.repeats):
        for name, cls in (("ours", BPETokenizer), ("hf", HFTokenizer)):
            tok = cls(vocab_size=args.vocab_size, pattern=args.pattern)
            t0 = time.perf_counter()
            tok.train(train_lines)
            train_times[name].append(time.perf_counter() - t0)
            if name == "ours":
                ours = tok
    train_ratio = [a / b for a, b in zip(train_times["ours"], train_times["hf"])]

    # --- encoding: a fresh process per contender and repeat --------------------------------------
    names = available()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"ours": str(Path(tmp) / "ours.json"), "hf": str(Path(tmp) / "tokenizer.json")}
        ours.save(files["ours"])
        ours.save_hf(files["hf"])
        worker_args = ["--files", json.dumps(files), "--data", str(test_file)]
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                runs[name].append(_report.run_worker(__file__, name, worker_args))
                print(f"  repeat {r + 1}: {name:<12} {runs[name][-1]['cold']:.3f} s cold")
    load_after = _report.load_average()

    def times(name: str, kind: str) -> list[float]:
        return [run[kind] for run in runs[name]]

    def ratios(name: str, kind: str, vs: str) -> list[float]:
        """Per repeat: how many times faster ``name`` is than ``vs`` (> 1: name is faster)."""
        return [b / a for a, b in zip(times(name, kind), times(vs, kind))]

    ref = names[0]  # ours with the C core, or the reference when the core is not built
    n_tok = runs[ref][0]["tokens"]
    digests = {n: {run["digest"] for run in runs[n]} for n in names}
    same = [n for n in names if digests[n] == digests[ref]]
    rows = [
        [
            CONTENDERS[n],
            median_spread(times(n, "cold")),
            f"{mb / statistics.median(times(n, 'cold')):.1f}",
            median_spread(times(n, "warm")),
            median_spread(times(n, "load")),
            median_spread(ratios(ref, "cold", n), "{:.2f}x") if n != ref else "1.00x",
            median_spread(ratios(ref, "warm", n), "{:.2f}x") if n != ref else "1.00x",
        ]
        for n in names
    ]
    headers = [
        "contender",
        "cold s: 1st encode_batch (min-max)",
        "cold MB/s",
        "warm s: 2nd call",
        "load s (import + file)",
        f"{CONTENDERS[ref]}: cold speed-up",
        "warm speed-up",
    ]
    encode_table = _report.table(headers, rows)
    train_table = _report.table(
        ["what", "time s (median, min-max)", "ours / tokenizers"],
        [
            ["train: ours (BPETokenizer)", median_spread(train_times["ours"], "{:.2f}"),
             median_spread(train_ratio, "{:.2f}x")],
            ["train: tokenizers BpeTrainer", median_spread(train_times["hf"], "{:.2f}"), "1.00x"],
        ],
    )  # fmt: skip
    checks = (
        f"ids identical to {CONTENDERS[ref]} on all {n_lines:,} lines: "
        + ", ".join(f"{CONTENDERS[n]} {'yes' if n in same else 'NO'}" for n in names[1:])
        + f"; {n_tok:,} tokens"
    )
    summary = ", ".join(
        f"cold {statistics.median(ratios(ref, 'cold', n)):.2f}x / warm "
        f"{statistics.median(ratios(ref, 'warm', n)):.2f}x {CONTENDERS[n]}"
        for n in names
        if n.startswith("hf")
    )
    print(train_table, encode_table, f"- {CONTENDERS[ref]} vs {summary}", f"- {checks}", sep="\n")
    print(f"- load average before {load_before}, after {load_after}")

    if not args.no_write:
        versions = ", ".join(f"{p} {version(p)}" for p in ("tokenizers", "tiktoken", "regex"))
        section = [
            _report.header(
                f"{args.pattern}, vocab {args.vocab_size}, median of {args.repeats}", argv
            ).rstrip("\n"),
            f"- packages: {versions}; load average before the run {load_before}",
            f"- data: trained on WikiText-2 raw validation; encoded: test, {mb:.2f} MB, "
            f"{n_lines:,} lines, a fresh process per contender and repeat",
            "",
            train_table,
            "",
            encode_table,
            "",
            f"- {CONTENDERS[ref]} vs {summary}",
            f"- {checks}",
            "",
        ]
        _report.append_section("(b) Tokenizer", "\n".join(section), args.results)
        print(f"appended to {args.results}")
    return 0 if len(same) == len(names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
