"""Peak resident memory of training and generation, at the default shape and ``model=gpt_small``,
and a check of the data path's copies of the token stream.

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --steps 20 --models gpt_mini

Each measurement runs in a fresh process and reports ``ru_maxrss`` (peak resident set) at its
end, and the peak minus the resident set after the imports (what the work itself added):

- train: ``pocketgpt.train.train`` as ``python -m pocketgpt.train`` runs it (MLflow to a
  temporary SQLite store, checkpoints), ``--steps`` steps and a full validation pass;
- train, bare reference: ``benchmarks/nanogpt_ref.py`` at the same shape, same steps;
- generate: ``pocketgpt.sampling.generate`` with its KV cache, batch 1 and 16, a 16-token prompt
  filled to the context, and without the cache;
- data path: RSS while drawing an epoch of batches from the memmapped token array (one copy of
  the stream at most: the page cache's), and while tokenizing the corpus into a fresh cache.

Appends a dated section to BENCHMARKS.md (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from bench_train import SHAPES  # one table of model shapes for all benchmarks

ROOT = Path(__file__).resolve().parents[1]

SECTION = "Memory"


def rss_mb() -> float:
    """Current resident set, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _imports():
    import mlflow  # noqa: F401
    import torch  # noqa: F401

    import pocketgpt.train  # noqa: F401


def worker_train(args) -> dict:
    import _compose

    _imports()
    base = rss_mb()
    _compose.train_in_temp(
        "bench-memory-", [f"model={args.model}", f"trainer.max_steps={args.steps}"]
    )
    return {"base": base, "peak": peak_mb()}


def worker_bare(args) -> dict:
    import nanogpt_ref as ref
    import torch
    from bench_train import token_files

    _imports()
    files = token_files()
    base = rss_mb()
    s = SHAPES[args.model]
    torch.manual_seed(0)
    model = ref.GPT(
        ref.RefConfig(
            vocab_size=files["vocab_size"],
            block_size=128,  # the training windows (data.block_size), as pocketgpt's
            n_layer=s["num_layers"],
            n_head=s["n_heads"],
            n_embd=s["d_model"],
            n_inner=s["d_ff"],
        )
    )
    ref.train(model, files["train"], args.steps)
    return {"base": base, "peak": peak_mb()}


def worker_generate(args) -> dict:
    import torch

    from pocketgpt.config import ModelConfig
    from pocketgpt.model import GPTMini
    from pocketgpt.sampling import SamplingConfig, generate

    _imports()
    base = rss_mb()
    s = SHAPES[args.model]
    torch.manual_seed(0)
    model = GPTMini(ModelConfig(vocab_size=8192, **s)).eval()
    prompt = torch.randint(0, 8192, (args.batch, 16))
    cfg = SamplingConfig(max_new_tokens=s["max_len"] - 16, use_cache=not args.no_cache)
    generate(model, prompt, cfg)
    return {"base": base, "peak": peak_mb()}


def worker_data(args) -> dict:
    """RSS growth while drawing an epoch of batches, and while tokenizing into a fresh cache."""
    from pocketgpt.config import DataConfig, TokenizerConfig
    from pocketgpt.data import ENCODE_CHUNK_LINES, TokenWindows, load_corpus, tokenize_corpus
    from pocketgpt.tokenizer import build_tokenizer

    _imports()
    cache = ROOT / ".cache/pocketgpt"
    corpus = load_corpus(DataConfig(), cache)
    tok, _ = build_tokenizer(TokenizerConfig(), corpus.train, cache)
    splits = tokenize_corpus(corpus, tok, cache)
    tokens = splits["train"].tokens
    base = rss_mb()
    windows = TokenWindows(tokens, 128)
    worst = 0.0
    for x, _y in windows.epoch_batches(16, 0, 1337):
        worst = max(worst, rss_mb() - base)
        assert x.shape == (16, 128)
    stream_mb = tokens.nbytes / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        before = rss_mb()
        peak_before = peak_mb()
        tokenize_corpus(corpus, tok, tmp)
        tokenize_growth = max(peak_mb() - max(before, peak_before), 0.0)
    return {
        "stream_mb": stream_mb,
        "train_tokens": len(tokens),
        "memmap": type(tokens).__name__,
        "epoch_growth_mb": worst,
        "tokenize_peak_growth_mb": tokenize_growth,
        "chunk_lines": ENCODE_CHUNK_LINES,
        "base": base,
        "peak": peak_mb(),
    }


def run_worker(name: str, args, extra: list[str]) -> dict:
    import _report

    return _report.run_worker(__file__, name, ["--steps", str(args.steps), *extra])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="gpt_mini", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        fn = {
            "train": worker_train,
            "bare": worker_bare,
            "generate": worker_generate,
            "data": worker_data,
        }[args.worker]
        Path(args.json).write_text(json.dumps(fn(args)))
        return 0

    import _report

    load_before = _report.load_average()
    rows = []
    for model in args.models:
        jobs = [
            ("train: pocketgpt (train.py, tracking on)", "train", []),
            ("train: bare reference", "bare", []),
            ("generate: KV cache, batch 1", "generate", ["--batch", "1"]),
            ("generate: KV cache, batch 16", "generate", ["--batch", "16"]),
            ("generate: no cache, batch 1", "generate", ["--batch", "1", "--no-cache"]),
        ]
        for label, worker, extra in jobs:
            res = run_worker(worker, args, ["--model", model, *extra])
            rows.append(
                [
                    model,
                    label,
                    f"{res['peak']:.0f}",
                    f"{res['peak'] - res['base']:.0f}",
                ]
            )
            print(rows[-1], flush=True)
    data = run_worker("data", args, [])
    table = _report.table(["model", "what", "peak RSS MB", "peak - RSS after imports, MB"], rows)
    notes = [
        f"- training: {args.steps} steps, batch 16 x 128 (data.block_size's default for both "
        f"presets), then a full validation pass (pocketgpt also: test pass, sample, model "
        f"logging); generation: a random-initialised model, 16-token prompt to the full context",
        f"- data path: the train split is a `{data['memmap']}` of {data['train_tokens']:,} tokens "
        f"({data['stream_mb']:.2f} MB, uint16) mapped from the token cache; drawing a whole epoch "
        f"of shuffled batches grew RSS by at most {data['epoch_growth_mb']:.1f} MB (each batch "
        f"gathers 16 x 129 tokens; the stream itself is only in the page cache, shared)",
        f"- tokenizing the corpus into a fresh cache raised the peak RSS by "
        f"{data['tokenize_peak_growth_mb']:.1f} MB (the stream is "
        f"{data['stream_mb']:.2f} MB): `data._write_token_file` encodes "
        f"{data['chunk_lines']:,} lines at a time and appends each chunk's ids to the file, so "
        "no step holds the whole stream, let alone two copies; it runs once per corpus and "
        "tokenizer, then the cache is memory-mapped",
        f"- load average before: {load_before}; after: {_report.load_average()}",
    ]
    print(table)
    print("\n".join(notes))
    if not args.no_write:
        head = _report.header(f"peak RSS, {args.steps} training steps", argv)
        _report.append_section(SECTION, head + "\n" + table + "\n\n" + "\n".join(notes))
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
