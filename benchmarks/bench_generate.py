"""Generated tokens/s: pocketgpt's KV-cache decoder vs no cache vs Hugging Face transformers.

    python benchmarks/bench_generate.py                      # batch 1, 4, 16; threads 1
    python benchmarks/bench_generate.py --threads 1 2 --repeats 7

All models are randomly initialised at GPTMini's shape (vocab 8192, d_model 128, 4 heads, d_ff
512, 4 layers, context 128) and decode greedily a 16-token prompt into 112 new tokens (exactly:
no <eos>), so a whole run fills the context once. Compared, per batch size and thread count:

- pocketgpt ``generate`` with its static KV cache, and with ``use_cache=False``;
- a nanoGPT-style loop without a cache (``GPTMini.forward`` on the last 128 tokens per step);
- transformers ``GPT2LMHeadModel.generate`` (n_embd 128, n_head 4, n_inner 512, n_layer 4,
  n_positions 128, vocab 8192) with and without its cache.

Each repeat runs every method once in turn (so load changes on a shared machine hit all of them
alike); the table shows the median. Appends a dated section to benchmarks/results_generate.md
(``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pocketgpt.model import GPTConfig, GPTMini  # noqa: E402
from pocketgpt.sampling import SamplingConfig, generate  # noqa: E402

VOCAB, PROMPT, NEW = 8192, 16, 112


def build_models(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    ours = GPTMini(GPTConfig(vocab_size=VOCAB)).eval()
    hf_cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,  # no <eos>: every call makes exactly NEW tokens, as ours does
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    return ours, hf


def nanogpt_loop(model: GPTMini, idx: torch.Tensor, n: int) -> torch.Tensor:
    """nanoGPT's generate, greedy: a full forward over the last max_len tokens per step."""
    with torch.inference_mode():
        for _ in range(n):
            logits = model(idx[:, -model.config.max_len :])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[:, -n:]


def methods(ours: GPTMini, hf) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    def hf_generate(use_cache: bool):
        def run(prompt):
            with torch.inference_mode():
                out = hf.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=NEW,
                    do_sample=False,
                    use_cache=use_cache,
                    pad_token_id=0,
                )
            return out[:, prompt.size(1) :]

        return run

    cached, uncached = SamplingConfig(max_new_tokens=NEW), SamplingConfig(NEW, use_cache=False)
    return {
        "pocketgpt generate, KV cache": lambda p: generate(ours, p, cached),
        "pocketgpt generate, no cache": lambda p: generate(ours, p, uncached),
        "nanoGPT-style loop, no cache": lambda p: nanogpt_loop(ours, p, NEW),
        "transformers generate, cache": hf_generate(True),
        "transformers generate, no cache": hf_generate(False),
    }


def measure(fns, batch: int, repeats: int) -> tuple[dict[str, list[float]], bool]:
    """-> tokens/s per method and repeat, and whether pocketgpt's three paths agree."""
    prompt = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    outs = {name: fn(prompt) for name, fn in fns.items()}  # warm-up, and the outputs
    for name, out in outs.items():
        assert out.shape == (batch, NEW), (name, tuple(out.shape))
    ours = [outs[k] for k in fns if not k.startswith("transformers")]
    agree = all(torch.equal(ours[0], o) for o in ours[1:])
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(prompt)
            rates[name].append(batch * NEW / (time.perf_counter() - start))
    return rates, agree


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {os.cpu_count()} CPUs ({usable} usable), {platform.platform()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results_generate.md"))
    ap.add_argument("--no-write", action="store_true", help="print only; do not append results")
    args = ap.parse_args(argv)

    import transformers

    ours, hf = build_models()
    fns = methods(ours, hf)
    load_before = os.getloadavg()
    started = datetime.now(UTC)
    lines = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        lines += [
            "",
            f"### torch threads: {threads}",
            "",
            "| batch | method | tokens/s (median) | vs transformers, cache (median of "
            "paired ratios) |",
            "|---:|---|---:|---:|",
        ]
        for batch in args.batch_sizes:
            rates, agree = measure(fns, batch, args.repeats)
            base = rates["transformers generate, cache"]
            for name, rate in rates.items():
                # each repeat's ratio compares runs made seconds apart, under the same load
                ratio = statistics.median(r / b for r, b in zip(rate, base))
                lines.append(
                    f"| {batch} | {name} | {statistics.median(rate):,.0f} | {ratio:.2f}x |"
                )
            if not agree:
                lines.append(f"| {batch} | (pocketgpt paths gave different tokens!) | | |")
            print("\n".join(lines[-len(rates) - (not agree) :]), flush=True)
    load_after = os.getloadavg()
    command = "python benchmarks/bench_generate.py " + " ".join(argv or sys.argv[1:])
    section = "\n".join(
        [
            f"## {started:%Y-%m-%d %H:%M} UTC: batch {args.batch_sizes}, median of {args.repeats}",
            "",
            f"- command: `{command.strip()}`",
            f"- machine: {machine()}; load average {load_before[0]:.2f} before, "
            f"{load_after[0]:.2f} after (a shared machine: other jobs compete for the cores)",
            f"- packages: Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}",
            f"- work: greedy, {PROMPT}-token prompt, {NEW} new tokens per row, tokens/s = "
            f"batch x {NEW} / wall time of the whole call; pocketgpt's cached, uncached and "
            "nanoGPT-loop paths produce identical tokens (checked)",
            *lines,
            "",
        ]
    )
    print(section)
    if not args.no_write:
        path = Path(args.results)
        old = (
            path.read_text(encoding="utf-8")
            if path.exists()
            else (
                "# Generation benchmark results\n\n"
                "`benchmarks/bench_generate.py`; summary and discussion in BENCHMARKS.md.\n\n"
            )
        )
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(old.rstrip("\n") + "\n\n" + section)
        os.replace(tmp, path)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
