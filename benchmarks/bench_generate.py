"""Generated tokens/s: pocketgpt's KV cache vs no cache vs Hugging Face transformers, warm and cold.

    python benchmarks/bench_generate.py                      # batch 1, 4, 16; threads 1
    python benchmarks/bench_generate.py --threads 1 2 --repeats 7

All models are randomly initialised at GPTMini's shape (vocab 8192, d_model 128, 4 heads, d_ff
512, 4 layers, context 128) and decode greedily a 16-token prompt into 112 new tokens (exactly:
no <eos>), so a whole run fills the context once. Compared, per batch size and thread count:

- pocketgpt ``generate`` with its static KV cache, and with ``use_cache=False``;
- a nanoGPT-style loop without a cache (``GPTMini.forward`` on the last 128 tokens per step);
- transformers ``GPT2LMHeadModel.generate`` (n_embd 128, n_head 4, n_inner 512, n_layer 4,
  n_positions 128, vocab 8192) with and without its cache.

Warm: after a warm-up call of each method, each repeat runs every method once in turn (so load
changes on a shared machine hit all of them alike). Cold: the first call of a method in a fresh
Python process (``--worker``), as ``python -m pocketgpt.generate`` makes it: the model is built
first and not timed; each repeat runs every method's process once in turn. The table shows the
median tokens/s and the median of the per-repeat ratios to transformers' cached ``generate``
(warm to warm, cold to cold), with their quartiles from 4 repeats up. Appends a dated section to
BENCHMARKS.md under (c) and refreshes its summary row (``--no-write`` to only print). Target: at
batch 1, at least 3x transformers' cached ``generate``, cold and warm; tokens/s growing with the
batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import _report
import torch

from pocketgpt.atomic import atomic_write_text
from pocketgpt.config import ModelConfig
from pocketgpt.model import GPTMini
from pocketgpt.sampling import SamplingConfig, generate

SECTION = "(c) Generation"
OURS, BASE = "pocketgpt generate, KV cache", "transformers generate, cache"
VOCAB, PROMPT, NEW = 8192, 16, 112
TARGET = 3.0  # at batch 1, cold and warm, x transformers' cached generate


def build_ours(seed: int = 0) -> GPTMini:
    torch.manual_seed(seed)
    return GPTMini(ModelConfig(vocab_size=VOCAB)).eval()


def build_hf(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
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
    return GPT2LMHeadModel(hf_cfg).eval()


def nanogpt_loop(model: GPTMini, idx: torch.Tensor, n: int) -> torch.Tensor:
    """nanoGPT's generate, greedy: a full forward over the last max_len tokens per step, the
    head applied to the last position only (as nanoGPT's inference forward does)."""
    with torch.inference_mode():
        for _ in range(n):
            hidden = model.hidden_states(idx[:, -model.config.max_len :])  # (B, T, C)
            logits = model.lm_head(hidden[:, -1])  # (B, V)
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[:, -n:]


METHODS = (
    OURS,
    "pocketgpt generate, no cache",
    "nanoGPT-style loop, no cache",
    BASE,
    "transformers generate, no cache",
)


def methods(ours: GPTMini | None, hf) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Method name -> a call generating NEW tokens for a prompt; either model may be None
    (a worker builds only the one it times), leaving its methods out."""

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
    fns = {}
    if ours is not None:
        fns[METHODS[0]] = lambda p: generate(ours, p, cached)
        fns[METHODS[1]] = lambda p: generate(ours, p, uncached)
        fns[METHODS[2]] = lambda p: nanogpt_loop(ours, p, NEW)
    if hf is not None:
        fns[METHODS[3]] = hf_generate(True)
        fns[METHODS[4]] = hf_generate(False)
    return fns


def make_prompt(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def measure(fns, batch: int, repeats: int) -> tuple[dict[str, list[float]], bool]:
    """Warm: -> tokens/s per method and repeat, and whether pocketgpt's three paths agree."""
    prompt = make_prompt(batch)
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


def worker(name: str, batch: int, threads: int, out: Path) -> None:
    """One cold measurement, in this fresh process: build the model, time the first call."""
    torch.set_num_threads(threads)
    hf = name.startswith("transformers")
    fn = methods(None if hf else build_ours(), build_hf() if hf else None)[name]
    prompt = make_prompt(batch)
    start = time.perf_counter()
    new = fn(prompt)
    seconds = time.perf_counter() - start
    assert new.shape == (batch, NEW), (name, tuple(new.shape))
    out.write_text(json.dumps({"seconds": seconds}))


def measure_cold(batch: int, threads: int, repeats: int) -> dict[str, list[float]]:
    """Cold: -> tokens/s per method and repeat, each the first call in a fresh process."""
    rates: dict[str, list[float]] = {name: [] for name in METHODS}
    argv = ["--batch", str(batch), "--threads", str(threads)]
    for _ in range(repeats):
        for name in METHODS:
            seconds = _report.run_worker(__file__, name, argv)["seconds"]
            rates[name].append(batch * NEW / seconds)
    return rates


def ratio_rows(batch: int, run: str, rates: dict[str, list[float]]) -> tuple[list[list], float]:
    """Table rows of one batch size and run kind, and the cached path's median ratio."""
    rows, ours = [], 0.0
    for name, rate in rates.items():
        # each repeat's ratio compares runs made seconds apart, under the same load
        paired = [r / b for r, b in zip(rate, rates[BASE], strict=True)]
        ratio = statistics.median(paired)
        spread = ""
        if len(paired) >= 4:  # the middle half of the repeats: how much the ratio moved
            q1, _, q3 = statistics.quantiles(paired, n=4)
            spread = f" ({q1:.2f}-{q3:.2f})"
        rows.append([batch, run, name, f"{statistics.median(rate):,.0f}", f"{ratio:.2f}x{spread}"])
        if name == OURS:
            ours = ratio
    return rows, ours


def set_target(target: str, path: Path = _report.RESULTS) -> None:
    """Write ``target`` into the target cell of the summary's (c) row (set_summary keeps it)."""
    if not path.exists():
        return
    with _report._locked(path):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, ln in enumerate(lines):
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            if ln.startswith("|") and cells[0] == "(c)" and len(cells) == 5 and cells[3] != target:
                cells[3] = target
                lines[i] = "| " + " | ".join(cells) + " |"
                atomic_write_text(path, "\n".join(lines) + "\n")
                return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=5, help="warm repeats")
    ap.add_argument("--cold-repeats", type=int, default=3, help="fresh processes per method")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one cold measurement (measure_cold)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.batch, args.threads[0], args.json)
        return 0

    import transformers

    fns = methods(build_ours(), build_hf())
    load_before = _report.load_average()
    lines: list[str] = []
    batch1: dict[int, tuple[float, float]] = {}  # threads -> (warm, cold) ratio at batch 1
    grows: list[bool] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = []
        ours_by_batch = []
        for batch in args.batch_sizes:
            rates, agree = measure(fns, batch, args.repeats)
            warm_rows, warm = ratio_rows(batch, "warm", rates)
            cold_rows, cold = ratio_rows(
                batch, "cold", measure_cold(batch, threads, args.cold_repeats)
            )
            rows += warm_rows + cold_rows
            if batch == 1:
                batch1[threads] = (warm, cold)
            ours_by_batch.append(statistics.median(rates[OURS]))
            if not agree:
                rows.append([batch, "", "(pocketgpt paths gave different tokens!)", "", ""])
            new_rows = warm_rows + cold_rows
            print(
                "\n".join(
                    _report.table(
                        ["batch", "run", "method", "tokens/s", "vs"], new_rows
                    ).splitlines()[2:]
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
                    "run",
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
        f"- warm: median of {args.repeats} repeats after a warm-up call; cold: the first call in "
        f"a fresh process (model built, not timed), median of {args.cold_repeats} processes per "
        "method, ratios cold to cold",
        f"- transformers {transformers.__version__}; load average before: {load_before}; after: "
        f"{_report.load_average()}",
    ]
    body = "\n".join([*notes, *lines])
    print(body)
    if not args.no_write:
        title = f"batch {args.batch_sizes}, median of {args.repeats} warm, {args.cold_repeats} cold"
        _report.append_section(SECTION, _report.header(title, argv) + "\n" + body)
        # The summary needs both halves of the target: batch 1 and more than one batch size.
        if 1 in args.batch_sizes and len(args.batch_sizes) > 1 and batch1:
            threads, (warm, cold) = max(batch1.items(), key=lambda kv: min(kv[1]))
            met = min(warm, cold) >= TARGET and all(grows)
            set_target(
                f">= {TARGET:g}x transformers at batch 1, cold and warm; tokens/s growing with "
                "the batch"
            )
            _report.set_summary(
                "(c)",
                f"KV cache {warm:.2f}x warm, {cold:.2f}x cold transformers at batch 1 ({threads} "
                f"thread{'s' if threads > 1 else ''}); tokens/s "
                f"{'grows' if all(grows) else 'does not grow'} with the batch",
                "yes" if met else "no",
            )
        print(f"appended to {_report.RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
