"""Generated tokens/s of the native C++ engine against our PyTorch path, transformers and ONNX
Runtime; where a token's time goes; int8's val bpb against fp32.

    python benchmarks/bench_native.py                         # batch 1 and 16, threads 1
    python benchmarks/bench_native.py --threads 2 --repeats 5
    python benchmarks/bench_native.py --bpb-model runs:/RUN_ID/model   # + int8 vs fp32 bpb

Work, as ``bench_generate.py``: a randomly initialised GPTMini of the default shape (vocab 8192,
d_model 128, 4 heads, d_ff 512, 4 layers, context 128), greedy, a 16-token prompt, 112 new
tokens per row (no <eos>). The same weights everywhere: the native engine reads the saved
folder, transformers gets a same-shape ``GPT2LMHeadModel`` (random, same seed: speed only), ONNX
Runtime runs the model exported with its KV cache. Same thread count for all (torch intra-op,
OpenMP, ONNX Runtime intra-op). Contenders:

- ``torch``: ``pocketgpt.sampling.generate`` on GPTMini (static KV cache): the reference path;
- ``native naive`` / ``native optimized`` / ``native int8`` (blocks in int8) / ``native int8 +
  head`` (the tied head too): ``generate`` on ``NativeGPT`` (sampling in Python either way);
- ``transformers``: ``GPT2LMHeadModel.generate`` with its cache;
- ``onnxruntime``: the ONNX export with KV-cache inputs and its runner. Interface used (issue 19's
  ``pocketgpt/export/onnx.py``): ``from pocketgpt.export.onnx import export_onnx, OnnxRunner``;
  ``export_onnx(model, path) -> path``; ``OnnxRunner(path, threads=N).generate(prompts,
  max_new_tokens) -> (B, n) ids``. Where it cannot be imported the row says "onnx: not
  available".

Warm: a warm-up call each, then every repeat runs every contender once in turn (load changes hit
all alike); median tokens/s and the median of per-repeat ratios to ``torch``. Cold: the first
call in a fresh process (the model loaded or built first, not timed; the native engine's
load, with its packing, is reported apart). Profile: the optimized engine's per-stage seconds
over one warm batch-1 call (``NativeKVCache.start_profile``), the rest of the wall time being
Python (sampling, the bridge). Appends a dated section to BENCHMARKS.md (``--no-write``: print
only). Targets (issue 17): optimized fp32 >= 2x torch at batch 1 and >= 1x ONNX Runtime; int8
>= 1.3x fp32 native; int8 val bpb <= 1% worse than fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _report
import numpy as np
import torch

from pocketgpt.config import EngineConfig, ModelConfig
from pocketgpt.model import GPTMini
from pocketgpt.model_io import save_model
from pocketgpt.native import open_engine
from pocketgpt.sampling import SamplingConfig, generate

SECTION = "(h) Native engine"
VOCAB, PROMPT, NEW = 8192, 16, 112
BASE = "torch"
NATIVE = {  # contender -> EngineConfig settings
    "native naive": dict(kernels="naive"),
    "native optimized": dict(kernels="optimized"),
    "native int8": dict(quantize="int8"),
    "native int8 + head": dict(quantize="int8", quantize_head=True),
}
METHODS = (BASE, *NATIVE, "transformers", "onnxruntime")


def build_ours(seed: int = 0) -> GPTMini:
    torch.manual_seed(seed)
    return GPTMini(ModelConfig(vocab_size=VOCAB)).eval()


def model_folder(root: Path) -> Path:
    """The benchmark model saved once (safetensors + config), as the engine reads it."""
    folder = root / "model"
    if not (folder / "model.safetensors").exists():
        save_model(build_ours(), folder)
    return folder


def onnx_available() -> str | None:
    """None when the ONNX export and runner import, else why not."""
    try:
        import onnxruntime  # noqa: F401

        from pocketgpt.export.onnx import OnnxRunner, export_onnx  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def make_method(name: str, root: Path, threads: int) -> tuple[Callable, float]:
    """-> (a call generating NEW tokens for a (B, T) prompt, seconds its loading took)."""
    cfg = SamplingConfig(max_new_tokens=NEW, stop_at_eos=False)
    start = time.perf_counter()
    if name == BASE:
        model = build_ours()
        fn = lambda p: generate(model, p, cfg)  # noqa: E731
    elif name in NATIVE:
        engine = open_engine(
            model_folder(root),
            "cpu",
            EngineConfig(engine="native", threads=threads, **NATIVE[name]),
        )
        fn = lambda p: generate(engine, p, cfg)  # noqa: E731
    elif name == "transformers":
        from bench_generate import build_hf

        hf = build_hf()

        def fn(p):
            with torch.inference_mode():
                out = hf.generate(
                    p,
                    attention_mask=torch.ones_like(p),
                    max_new_tokens=NEW,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=0,
                )
            return out[:, p.size(1) :]
    else:
        from pocketgpt.export.onnx import OnnxRunner, export_onnx

        path = root / "onnx" / "model.onnx"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            export_onnx(build_ours(), path)
        runner = OnnxRunner(path, threads=threads)
        fn = lambda p: torch.from_numpy(np.asarray(runner.generate(p.tolist(), NEW)))  # noqa: E731
    return fn, time.perf_counter() - start


def make_prompt(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def measure(fns: dict[str, Callable], batch: int, repeats: int):
    """Warm: -> tokens/s per method and repeat, and whether the fp32 paths gave equal tokens."""
    prompt = make_prompt(batch)
    outs = {name: fn(prompt) for name, fn in fns.items()}  # warm-up, and the outputs
    exact = [n for n in fns if n in (BASE, "native naive", "native optimized")]
    agree = all(torch.equal(outs[exact[0]], outs[n]) for n in exact[1:])
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(prompt)
            rates[name].append(batch * NEW / (time.perf_counter() - start))
    return rates, agree


def worker(name: str, batch: int, threads: int, root: Path, out: Path) -> None:
    """One cold measurement in this fresh process: load, then time the first call."""
    torch.set_num_threads(threads)
    fn, load_s = make_method(name, root, threads)
    prompt = make_prompt(batch)
    start = time.perf_counter()
    fn(prompt)
    out.write_text(json.dumps({"seconds": time.perf_counter() - start, "load": load_s}))


def measure_cold(names, batch: int, threads: int, root: Path, repeats: int):
    rates: dict[str, list[float]] = {n: [] for n in names}
    loads: dict[str, list[float]] = {n: [] for n in names}
    argv = ["--batch", str(batch), "--threads", str(threads), "--root", str(root)]
    for _ in range(repeats):
        for name in names:
            r = _report.run_worker(__file__, name, argv)
            rates[name].append(batch * NEW / r["seconds"])
            loads[name].append(r["load"])
    return rates, loads


def ratio(rates: dict[str, list[float]], name: str, base: str) -> tuple[float, str]:
    paired = [a / b for a, b in zip(rates[name], rates[base], strict=True)]
    spread = ""
    if len(paired) >= 4:
        q1, _, q3 = statistics.quantiles(paired, n=4)
        spread = f" ({q1:.2f}-{q3:.2f})"
    return statistics.median(paired), spread


def profile(root: Path, threads: int) -> tuple[list[list], float]:
    """The optimized engine at batch 1: per-stage ms per token, and the Python share."""
    engine = open_engine(model_folder(root), "cpu", EngineConfig(engine="native", threads=threads))
    caches = []
    new_cache = engine.new_kv_cache

    def profiled_cache(batch_size: int):
        cache = new_cache(batch_size)
        cache.start_profile()
        caches.append(cache)
        return cache

    engine.new_kv_cache = profiled_cache  # this benchmark's instance only
    cfg = SamplingConfig(max_new_tokens=NEW, stop_at_eos=False)
    prompt = make_prompt(1)
    generate(engine, prompt, cfg)  # warm-up
    caches.clear()
    start = time.perf_counter()
    generate(engine, prompt, cfg)
    wall = time.perf_counter() - start
    stages = caches[0].profile()
    engine_s = sum(stages.values())
    rows = [
        [name, f"{1e3 * s / NEW:.4f}", f"{100 * s / wall:.1f}%"]
        for name, s in sorted(stages.items(), key=lambda kv: -kv[1])
    ]
    rest = wall - engine_s
    rows.append(
        ["Python: sampling, bridge, loop", f"{1e3 * rest / NEW:.4f}", f"{100 * rest / wall:.1f}%"]
    )
    rows.append(["total", f"{1e3 * wall / NEW:.4f}", "100%"])
    return rows, wall


def bpb_rows(uri: str, threads: int) -> list[list]:
    """Validation bits per byte of a trained model: torch, native fp32, int8, int8 + head."""
    from pocketgpt.config import DataConfig
    from pocketgpt.data import TokenizedSplit, load_corpus
    from pocketgpt.evaluation import evaluate
    from pocketgpt.loading import load

    with tempfile.TemporaryDirectory() as cache:
        text = load_corpus(DataConfig(), cache).validation
    rows, base = [], None
    for label, settings in [
        ("torch", dict(engine="torch")),
        ("native fp32", dict(engine="native")),
        ("native int8", dict(engine="native", quantize="int8")),
        ("native int8 + head", dict(engine="native", quantize="int8", quantize_head=True)),
    ]:
        model, tok = load(uri, threads=threads, **settings)
        split = TokenizedSplit(np.array(tok.encode(text), dtype=np.int64), len(text.encode()))
        result = evaluate(model, split, model.config.max_len, 16, torch.device("cpu"))
        base = base if base is not None else result.bpb
        rows.append([label, f"{result.bpb:.5f}", f"{100 * (result.bpb / base - 1):+.3f}%"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="warm repeats")
    ap.add_argument("--cold-repeats", type=int, default=3, help="fresh processes per method")
    ap.add_argument("--bpb-model", help="a trained model's URI or folder: int8 vs fp32 val bpb")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.batch, args.threads, args.root, args.json)
        return 0

    import transformers

    torch.set_num_threads(args.threads)
    missing_onnx = onnx_available()
    names = [n for n in METHODS if not (n == "onnxruntime" and missing_onnx)]
    if missing_onnx:
        print(f"onnx: not available ({missing_onnx})")
    load_before = _report.load_average()
    lines: list[str] = []
    summary: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-native-") as tmp:
        root = Path(tmp)
        model_folder(root)
        fns = {n: make_method(n, root, args.threads)[0] for n in names}
        rows = []
        for batch in args.batch_sizes:
            warm, agree = measure(fns, batch, args.repeats)
            cold, loads = measure_cold(names, batch, args.threads, root, args.cold_repeats)
            for kind, rates in (("warm", warm), ("cold", cold)):
                for n in names:
                    r, spread = ratio(rates, n, BASE)
                    load = f"{1e3 * statistics.median(loads[n]):.0f} ms" if kind == "cold" else ""
                    rows.append(
                        [
                            batch,
                            kind,
                            n,
                            f"{statistics.median(rates[n]):,.0f}",
                            f"{r:.2f}x{spread}",
                            load,
                        ]
                    )
                    summary[f"{batch}/{kind}/{n}"] = r
            if not agree:
                rows.append([batch, "", "(fp32 paths gave different tokens!)", "", "", ""])
            print(
                "\n".join(
                    _report.table(
                        ["b", "run", "method", "tok/s", "vs torch", "load"], rows[-2 * len(names) :]
                    ).splitlines()[2:]
                ),
                flush=True,
            )
        prof, _ = profile(root, args.threads)
    lines += [
        _report.table(
            [
                "batch",
                "run",
                "method",
                "tokens/s (median)",
                "vs torch (median ratio, quartiles)",
                "load (cold)",
            ],
            rows,
        ),
        "",
        f"Where a batch-1 token's time goes (native optimized, {args.threads} thread(s), one warm "
        f"call of {NEW} tokens):",
        "",
        _report.table(["stage", "ms per token", "share of wall"], prof),
    ]
    if args.bpb_model:
        lines += [
            "",
            f"Validation bits per byte of `{args.bpb_model}` (embedded WikiText-2 validation, "
            "128-token windows):",
            "",
            _report.table(
                ["engine", "val bpb", "vs torch"], bpb_rows(args.bpb_model, args.threads)
            ),
        ]

    def r(key: str) -> str:
        return f"{summary[key]:.2f}x" if key in summary else "n/a"

    findings = []
    for kind in ("warm", "cold"):
        opt, i8, i8h = (
            summary.get(f"1/{kind}/native {k}") for k in ("optimized", "int8", "int8 + head")
        )
        ort = summary.get(f"1/{kind}/onnxruntime")
        findings.append(
            f"- batch 1, {kind}: optimized {r(f'1/{kind}/native optimized')} torch"
            + (
                f", {opt / ort:.2f}x ONNX Runtime"
                if opt and ort
                else ", ONNX Runtime: not available"
            )
            + (
                f"; int8 {i8 / opt:.2f}x and int8 + head {i8h / opt:.2f}x optimized fp32"
                if opt
                else ""
            )
        )
    notes = [
        *findings,
        f"- work: greedy, {PROMPT}-token prompt, {NEW} new tokens per row; tokens/s = batch x {NEW} "
        "/ wall time of the whole call (prefill included); torch, native naive and native "
        "optimized give identical tokens (checked each run)",
        f"- threads: {args.threads} for every contender; warm: median of {args.repeats} "
        f"interleaved repeats; cold: first call in a fresh process, {args.cold_repeats} per method",
        f"- transformers {transformers.__version__}"
        + ("" if missing_onnx else f", onnxruntime {__import__('onnxruntime').__version__}")
        + f"; load average before: {load_before}; after: {_report.load_average()}",
    ]
    body = "\n".join([*notes, "", *lines])
    print(body)
    if not args.no_write:
        title = f"batch {args.batch_sizes}, {args.threads} thread(s)"
        _report.append_section(SECTION, _report.header(title, argv) + "\n" + body)
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
