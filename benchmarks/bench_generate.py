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

After a warm-up call of each method (and of pocketgpt's cached path, as many as its decoder
needs to compile its kernel: the steady state), each repeat runs every method once in turn (so
load changes on a shared machine hit all of them alike); the table shows the median tokens/s
and the median of the per-repeat ratios, with their quartiles from 4 repeats up. Appends a dated
section to BENCHMARKS.md under (c) and refreshes its summary row (``--no-write`` to only print).
Target (issue 4): at batch 1, at least 5x transformers' cached ``generate``; tokens/s growing
with the batch.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402

from pocketgpt.model import GPTConfig, GPTMini  # noqa: E402
from pocketgpt.sampling import COMPILE_AFTER_STEPS, SamplingConfig, generate  # noqa: E402

SECTION = "(c) Generation"
OURS, BASE = "pocketgpt generate, KV cache", "transformers generate, cache"
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
        OURS: lambda p: generate(ours, p, cached),
        "pocketgpt generate, no cache": lambda p: generate(ours, p, uncached),
        "nanoGPT-style loop, no cache": lambda p: nanogpt_loop(ours, p, NEW),
        "transformers generate, cache": hf_generate(True),
        "transformers generate, no cache": hf_generate(False),
    }


def measure(fns, batch: int, repeats: int) -> tuple[dict[str, list[float]], bool]:
    """-> tokens/s per method and repeat, and whether pocketgpt's three paths agree."""
    prompt = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    outs = {name: fn(prompt) for name, fn in fns.items()}  # warm-up, and the outputs
    # A decoder compiles its step kernel after COMPILE_AFTER_STEPS steps: warm ours up to that
    # steady state, as a server or a notebook reaches it.
    for _ in range(math.ceil(COMPILE_AFTER_STEPS / (NEW - 1))):
        fns[OURS](prompt)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append results")
    args = ap.parse_args(argv)

    import transformers

    ours, hf = build_models()
    fns = methods(ours, hf)
    load_before = _report.load_average()
    lines: list[str] = []
    batch1: dict[int, float] = {}  # threads -> pocketgpt/transformers ratio at batch 1
    grows: list[bool] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = []
        ours_by_batch = []
        for batch in args.batch_sizes:
            rates, agree = measure(fns, batch, args.repeats)
            for name, rate in rates.items():
                # each repeat's ratio compares runs made seconds apart, under the same load
                paired = [r / b for r, b in zip(rate, rates[BASE], strict=True)]
                ratio = statistics.median(paired)
                spread = ""
                if len(paired) >= 4:  # the middle half of the repeats: how much the ratio moved
                    q1, _, q3 = statistics.quantiles(paired, n=4)
                    spread = f" ({q1:.2f}-{q3:.2f})"
                rows.append(
                    [batch, name, f"{statistics.median(rate):,.0f}", f"{ratio:.2f}x{spread}"]
                )
                if name == OURS and batch == 1:
                    batch1[threads] = ratio
            ours_by_batch.append(statistics.median(rates[OURS]))
            if not agree:
                rows.append([batch, "(pocketgpt paths gave different tokens!)", "", ""])
            print(
                "\n".join(
                    _report.table(["batch", "method", "tokens/s", "vs"], rows[-5:]).splitlines()[2:]
                ),
                flush=True,
            )
        grows.append(all(b > a for a, b in zip(ours_by_batch, ours_by_batch[1:])))
        lines += [
            "",
            f"torch threads: {threads}",
            "",
            _report.table(
                [
                    "batch",
                    "method",
                    "tokens/s (median)",
                    "vs transformers, cache (median ratio, quartiles)",
                ],
                rows,
            ),
        ]
    notes = [
        f"- work: greedy, {PROMPT}-token prompt, {NEW} new tokens per row, tokens/s = batch x "
        f"{NEW} / wall time of the whole call (prefill included); pocketgpt's cached, uncached "
        "and nanoGPT-loop paths produce identical tokens (checked each run)",
        f"- transformers {transformers.__version__}; load average before: {load_before}; after: "
        f"{_report.load_average()}",
    ]
    body = "\n".join([*notes, *lines])
    print(body)
    if not args.no_write:
        head = _report.header(f"batch {args.batch_sizes}, median of {args.repeats}", argv)
        _report.append_section(SECTION, head + "\n" + body)
        # The summary needs both halves of the target: batch 1 and more than one batch size.
        if 1 in args.batch_sizes and len(args.batch_sizes) > 1 and batch1:
            threads, best = max(batch1.items(), key=lambda kv: kv[1])
            met = best >= 5 and all(grows)
            _report.set_summary(
                "(c)",
                f"KV cache {best:.2f}x transformers at batch 1 ({threads} thread"
                f"{'s' if threads > 1 else ''}); tokens/s "
                f"{'grows' if all(grows) else 'does not grow'} with the batch",
                "yes" if met else "no",
            )
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
