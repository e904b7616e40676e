"""A GPTMini as an ONNX graph with a KV cache, and a small ONNX Runtime runner that generates.

Public API (what the benchmarks and other engines use)::

    from pocketgpt.export.onnx import export_onnx, OnnxRunner
    export_onnx(model, "out/model.onnx")            # -> Path; writes model.onnx + onnx_config.json
    runner = OnnxRunner("out/model.onnx", threads=1)  # an onnxruntime.InferenceSession inside
    new = runner.generate([[5, 6, 7], [8, 9]], max_new_tokens=20)  # -> list of new-id lists
    new = runner.generate(ids, 20, sampling=SamplingConfig(temperature=0.8, top_k=50, seed=1))

One graph serves prefill and decode (the layout of Hugging Face Optimum's decoder exports):

    inputs   input_ids (B, T) int64, position_ids (B, T) int64,
             attention_mask (B, P + T) int64 (1 = real token, 0 = padding),
             past_key_values.{i}.key / .value (B, nh, P, hs) float32 for each layer i
    outputs  logits (B, T, vocab) float32,
             present.{i}.key / .value (B, nh, P + T, hs): the next call's past

A prefill passes P = 0 (empty past tensors) and the whole left-padded prompt; each decoding step
passes one token per row and the previous step's presents. Padding is masked out of attention
and each row's positions count from its first real token, as ``pocketgpt.sampling`` does, so a
row gets the same tokens alone or in a batch. Generation stops at the model's ``max_len``
context (no sliding window, unlike ``pocketgpt.sampling``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pocketgpt.config import SamplingConfig
from pocketgpt.errors import ExportError, ModelFileError, SamplingError
from pocketgpt.model import GPTMini

CONFIG_FILE = "onnx_config.json"  # beside model.onnx: the shapes and ids the runner needs
DEFAULT_OPSET = 18


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "position_ids", "attention_mask"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class CachedDecoder(nn.Module):
    """GPTMini's forward with the cache as explicit inputs and outputs (an exportable graph).

    The same weights and operations as ``GPTMini.forward``; the attention is written out
    (scores, mask, softmax) so every exporter and opset can express it.
    """

    def __init__(self, model: GPTMini):
        super().__init__()
        self.model = model
        cfg = model.config
        self.n_heads, self.head_size = cfg.n_heads, cfg.d_model // cfg.n_heads

    def forward(self, input_ids, position_ids, attention_mask, *past):
        m = self.model
        B, T = input_ids.shape
        nh, hs = self.n_heads, self.head_size
        x = m.tok_emb(input_ids) + m.pos_emb(position_ids)  # (B, T, C)
        P = past[0].shape[2]
        # Query t sits at column P + t; it sees real keys up to its column, and itself always
        # (a padding query then has a finite softmax row, whose output nobody reads).
        q_col = torch.arange(T, device=x.device)[:, None] + P  # (T, 1)
        k_col = torch.arange(attention_mask.shape[1], device=x.device)[None, :]  # (1, P+T)
        real = attention_mask[:, None, None, :].bool()  # (B, 1, 1, P+T)
        allowed = ((k_col <= q_col) & real) | (k_col == q_col)  # (B, 1, T, P+T)
        presents = []
        for i, block in enumerate(m.blocks):
            a = block.attn
            h = block.ln1(x)
            qkv = a.qkv(h).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
            k = torch.cat([past[2 * i], qkv[1]], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([past[2 * i + 1], qkv[2]], dim=2)
            presents += [k, v]
            scores = qkv[0] @ k.transpose(-2, -1) * (1.0 / math.sqrt(hs))  # (B, nh, T, P+T)
            scores = scores.masked_fill(~allowed, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v  # (B, nh, T, hs)
            x = x + a.proj(y.transpose(1, 2).reshape(B, T, nh * hs))
            x = x + block.ff(block.ln2(x))
        logits = m.lm_head(m.ln_f(x))  # (B, T, vocab)
        return (logits, *presents)


def _example_inputs(model: GPTMini, batch: int = 2, seq: int = 3, past: int = 4):
    cfg = model.config
    hs = cfg.d_model // cfg.n_heads
    ids = torch.zeros(batch, seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    kv = [torch.zeros(batch, cfg.n_heads, past, hs) for _ in range(2 * cfg.num_layers)]
    return (ids, pos, mask, *kv)


def export_onnx(model: GPTMini, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``path`` (model.onnx) and ``onnx_config.json`` beside it; -> ``path``.

    Uses torch's TorchScript-based exporter: its dynamic axes express "past + seq" without
    the symbolic-shape constraints of the dynamo exporter, and it needs no onnxscript.
    """
    path = Path(path)
    cfg = model.config
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model stays as it was
    decoder = CachedDecoder(model).eval()
    n = cfg.num_layers
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"}}
    dynamic["attention_mask"] = {0: "batch", 1: "total"}
    dynamic["logits"] = {0: "batch", 1: "seq"}
    for i in range(n):
        for kind in ("key", "value"):
            dynamic[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past"}
            dynamic[f"present.{i}.{kind}"] = {0: "batch", 2: "total"}
    with torch.no_grad():
        torch.onnx.export(
            decoder,
            _example_inputs(model),
            str(path),
            input_names=input_names(n),
            output_names=output_names(n),
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    meta = {
        "format": "pocketgpt-onnx",
        "version": 1,
        "num_layers": n,
        "n_heads": cfg.n_heads,
        "head_size": cfg.d_model // cfg.n_heads,
        "max_len": cfg.max_len,
        "vocab_size": cfg.vocab_size,
        "opset": opset,
    }
    (path.parent / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


class OnnxRunner:
    """An exported graph in an ``onnxruntime.InferenceSession``, generating with its KV cache.

    ``path``: model.onnx written by ``export_onnx`` (its onnx_config.json beside it).
    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(
                "onnxruntime is not installed; pip install 'pocketgpt[onnx]' (or onnxruntime)"
            ) from None
        path = Path(path)
        meta_path = path.parent / CONFIG_FILE
        for p in (path, meta_path):
            if not p.is_file():
                raise ModelFileError(f"{p} is missing; export with pocketgpt-export format=onnx")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.num_layers, self.n_heads = int(meta["num_layers"]), int(meta["n_heads"])
            self.head_size, self.max_len = int(meta["head_size"]), int(meta["max_len"])
            self.vocab_size = int(meta["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFileError(
                f"{meta_path} is not an onnx_config.json of pocketgpt ({e}); export again"
            ) from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime's own error types for unreadable graphs
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelFileError(f"{path} is not a loadable ONNX graph ({first})") from None
        self._inputs = input_names(self.num_layers)
        self._outputs = output_names(self.num_layers)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past tensors for a prefill: 2 per layer, each (B, nh, 0, hs)."""
        shape = (batch, self.n_heads, 0, self.head_size)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers)]

    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph -> (logits (B, T, vocab), presents: the next call's past)."""
        feed = dict(zip(self._inputs, [input_ids, position_ids, attention_mask, *past]))
        logits, *presents = self.session.run(self._outputs, feed)
        return logits, presents

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | np.ndarray,
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        eos_id: int | None = None,
    ) -> np.ndarray:
        """Prompts (B lists of ids, any lengths; or a (B, T) array) -> new ids (B, n).

        Greedy unless ``sampling`` says otherwise (temperature, top_k, top_p, repetition
        penalty and seed as ``pocketgpt.sampling``). With ``eos_id`` (and ``stop_at_eos``)
        it stops once every row has produced it; a row done first is filled with ``eos_id``.
        """
        cfg = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
        rows = [list(map(int, r)) for r in prompts]
        if not rows or any(not r for r in rows):
            raise SamplingError("a prompt is empty (0 tokens); give each prompt at least one")
        flat = [t for r in rows for t in r]
        if min(flat) < 0 or max(flat) >= self.vocab_size:
            raise SamplingError(
                f"prompt token ids must lie in 0..{self.vocab_size - 1}; encode prompts with "
                "the model's own tokenizer"
            )
        longest = max(len(r) for r in rows)
        if max_new_tokens > 0 and longest + max_new_tokens - 1 > self.max_len:
            raise SamplingError(
                f"a {longest}-token prompt and max_new_tokens={max_new_tokens} need "
                f"{longest + max_new_tokens - 1} positions, more than max_len={self.max_len}; "
                "the ONNX runner does not slide its window: shorten either"
            )
        B = len(rows)
        if max_new_tokens == 0:
            return np.zeros((B, 0), dtype=np.int64)
        pads = np.array([longest - len(r) for r in rows])
        ids = np.array([[0] * p + r for p, r in zip(pads, rows)], dtype=np.int64)  # (B, T0)
        mask = (np.arange(longest)[None, :] >= pads[:, None]).astype(np.int64)  # (B, T0)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # each row from 0 at its start
        stop = eos_id is not None and cfg.stop_at_eos
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        seen = None  # (B, V) tokens so far, for the repetition penalty
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.vocab_size, dtype=torch.bool)
            for b, r in enumerate(rows):
                seen[b, r] = True
        finished = np.zeros(B, dtype=bool)
        out = np.zeros((B, max_new_tokens), dtype=np.int64)
        logits, past = self.forward(ids, positions, mask, self.empty_past(B))
        next_pos = positions[:, -1] + 1  # (B,)
        n = 0
        for n in range(1, max_new_tokens + 1):
            next_id = self._pick(logits[:, -1], cfg, seen, gen)  # (B,)
            if stop:
                next_id = np.where(finished, eos_id, next_id)
                finished |= next_id == eos_id
            out[:, n - 1] = next_id
            if seen is not None:
                seen[torch.arange(B), torch.from_numpy(next_id)] = True
            if n == max_new_tokens or (stop and finished.all()):
                break
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(next_id[:, None], next_pos[:, None], mask, past)
            next_pos = next_pos + 1
        return out[:, :n]

    @staticmethod
    def _pick(logits: np.ndarray, cfg: SamplingConfig, seen, gen) -> np.ndarray:
        """Last-position logits (B, V) -> the next ids (B,), by ``pocketgpt.sampling``'s policy."""
        from pocketgpt.sampling import apply_repetition_penalty, filter_logits

        if seen is None and cfg.temperature <= 0:
            return logits.argmax(axis=-1)  # greedy: the first maximum, as ours
        t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
        if seen is not None:
            t = apply_repetition_penalty(t, seen, cfg.repetition_penalty)
        if cfg.temperature <= 0:
            return t.argmax(dim=-1).numpy()
        probs = torch.softmax(filter_logits(t / cfg.temperature, cfg.top_k, cfg.top_p), -1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0].numpy()
