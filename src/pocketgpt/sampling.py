"""Text generation with a static KV cache: greedy, temperature, top-k, top-p, repetition penalty.

The prompt runs once (prefill) and fills a preallocated cache of ``max_len`` positions per layer;
each new token then costs one position. ``KVDecoder`` is GPTMini's forward written out for
inference on pre-transposed weights with as few small ops as possible (its one-token step is
``pocketgpt.decode_step``): at GPTMini's size a step is bound by per-op overhead, not
arithmetic. ``tests/test_generate.py`` checks it against ``GPTMini.forward`` (logits within
1e-5).

Context limit: a prompt longer than ``max_len`` keeps its last ``max_len`` tokens (truncated
from the left). When the sequence outgrows the context the window slides. With ``slide=1`` (the
default) every further token is predicted from exactly the last ``max_len`` tokens, as
recomputing without a cache would: a fresh prefill per token, exact but slower. ``slide=N``
moves the window N tokens at once, so one prefill serves N tokens: faster, but right after a
slide the model sees only ``max_len - N + 1`` tokens.

Batches: prompts of different lengths are left-padded; padding is masked out of attention and
each row's positions start at 0 at its first real token, so a row gets the same tokens alone or
in a batch (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pocketgpt.decode_step import StepKernel, compile_kernel
from pocketgpt.model import GPTMini


class SamplingError(ValueError):
    """A sampling setting or prompt that cannot work; the message names the value and the fix."""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 40
    temperature: float = 0.0  # 0 = greedy (argmax); top_k and top_p then do nothing
    top_k: int | None = None  # keep the k most likely tokens; None or 0 = off
    top_p: float | None = None  # keep the smallest set reaching probability p; None or 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    seed: int | None = None  # a private RNG for reproducible sampling; None = torch's global RNG
    stop_at_eos: bool = True
    slide: int = 1  # how far the window moves when the context is full (see the module doc)
    use_cache: bool = True  # False: re-run the whole window every step (a reference, and slower)


def check_sampling(cfg: SamplingConfig, max_len: int | None = None) -> None:
    """Raise SamplingError naming the first bad setting and the fix."""
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens={cfg.max_new_tokens!r} must be an integer >= 0")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise SamplingError(f"temperature={cfg.temperature} must be >= 0 (0 = greedy)")
    if cfg.top_k is not None and cfg.top_k < 0:
        raise SamplingError(f"top_k={cfg.top_k} must be >= 0 (0 or null = off)")
    if cfg.top_p is not None and not 0.0 <= cfg.top_p <= 1.0:
        raise SamplingError(f"top_p={cfg.top_p} must be in [0, 1] (1 or null = off)")
    if not (math.isfinite(cfg.repetition_penalty) and cfg.repetition_penalty > 0):
        raise SamplingError(
            f"repetition_penalty={cfg.repetition_penalty} must be > 0 (1 = off, >1 penalizes)"
        )
    if cfg.slide < 1 or (max_len is not None and cfg.slide > max_len):
        bound = f"model max_len={max_len}" if max_len is not None else "the model's max_len"
        raise SamplingError(f"slide={cfg.slide} must be between 1 and {bound}")


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (B, V)."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, sorted_idx, drop), float("-inf"))
    return logits


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty: seen tokens' logits are divided by ``penalty`` if positive, else
    multiplied. logits (B, V), seen (B, V) bool."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


class _Layer(NamedTuple):
    """One block's weights; matrices are (in, out) so a Linear is one ``addmm(b, x, W)``."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor | None
    qkv_w: torch.Tensor  # (C, 3C), columns [q / sqrt(head_size) | k | v]
    qkv_b: torch.Tensor | None
    proj_w: torch.Tensor  # (C, C)
    proj_b: torch.Tensor | None
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor | None
    fc_w: torch.Tensor  # (C, d_ff)
    fc_b: torch.Tensor | None
    out_w: torch.Tensor  # (d_ff, C)
    out_b: torch.Tensor | None


def _t(linear: torch.nn.Linear) -> torch.Tensor:
    # (out, in) -> contiguous (in, out): x @ W on a row-major W is ~2x faster than x @ W.T here
    return linear.weight.detach().t().contiguous()


def _bias(module: torch.nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)


def _qkv_scaled(attn, n_heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv weights (C, 3C) and bias with the q part pre-scaled by 1/sqrt(head_size), so the
    attention scores need no scaling."""
    C = attn.qkv.in_features
    scale = 1.0 / math.sqrt(C // n_heads)
    w, b = _t(attn.qkv), _bias(attn.qkv)
    w[:, :C] *= scale
    if b is not None:
        b = b.clone()
        b[:C] *= scale
    return w, b


class _Weights(NamedTuple):
    tok_emb: torch.Tensor  # (V, C)
    pos_emb: torch.Tensor  # (max_len, C)
    layers: list[_Layer]
    ln_f: tuple[torch.Tensor, torch.Tensor | None]
    head: torch.Tensor  # (C, V)


_CACHE_ATTR = "_pocketgpt_decode_weights"


def _decode_weights(model: GPTMini) -> _Weights:
    """The decoder's layout of the weights, kept on the model until a parameter changes.

    Building it copies every matrix (~13 ms at GPTMini's size, a lot for a short generation);
    an in-place update (an optimizer step, load_state_dict) bumps a parameter's version and a
    move to another device or dtype changes its storage, and either rebuilds it.
    """
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        weights = _Weights(
            tok_emb=model.tok_emb.weight.detach(),
            pos_emb=model.pos_emb.weight.detach(),
            layers=[
                _Layer(
                    b.ln1.weight.detach(),
                    _bias(b.ln1),
                    *_qkv_scaled(b.attn, model.config.n_heads),
                    _t(b.attn.proj),
                    _bias(b.attn.proj),
                    b.ln2.weight.detach(),
                    _bias(b.ln2),
                    _t(b.ff.fc),
                    _bias(b.ff.fc),
                    _t(b.ff.proj),
                    _bias(b.ff.proj),
                )  # fmt: skip
                for b in model.blocks
            ],
            ln_f=(model.ln_f.weight.detach(), _bias(model.ln_f)),
            head=_t(model.lm_head),
        )
    model.__dict__[_CACHE_ATTR] = (key, weights)  # a plain attribute: not in the state_dict
    return weights


COMPILE_AFTER_STEPS = 512  # steps a decoder runs eagerly before its kernel is compiled


class KVDecoder:
    """GPTMini inference with a static KV cache: per layer (2, B, heads, max_len, head_size).

    ``prefill(ids)`` runs a window from position 0 and returns the last position's logits;
    ``step(ids)`` appends one token per row and returns its logits. ``pads`` (B,) gives each
    row's number of left-padding tokens in the window, masked out of attention. This is
    GPTMini.forward rearranged for speed; the tests hold it to 1e-5 of it.

    At GPTMini's size a one-token step costs what its torch calls cost to dispatch and what
    its weights cost to read, not arithmetic, so ``step`` makes as few calls as it can, in one
    TorchScript call once the decoder has been used enough to repay compiling it
    (``decode_step.StepKernel``, ``compile_when_due``): it writes into buffers allocated once, and
    attention always spans all ``max_len`` cache slots under an additive mask (0 on filled
    slots, -inf elsewhere) instead of slicing the cache to the current length. ``generate``
    keeps its decoders on the model for the next calls, so repeated calls skip that set-up.
    """

    def __init__(self, model: GPTMini, batch_size: int):
        cfg = model.config
        self.batch_size = batch_size
        self.n_heads, self.d_model, self.max_len = cfg.n_heads, cfg.d_model, cfg.max_len
        self.head_size = cfg.d_model // cfg.n_heads
        self.eps = model.ln_f.eps
        w = self.weights = _decode_weights(model)
        self.tok_emb, self.pos_emb, self.layers = w.tok_emb, w.pos_emb, w.layers  # for prefill
        # The output layer reads 4 MB of weights a step at the default shape. x @ (C, V) runs as
        # a matrix-vector product at one row, the fastest there; from 4 rows up that path is 2x
        # slower than (V, C) @ x.T on a cold cache (BENCHMARKS.md, section (c)).
        head_rows = model.lm_head.weight.detach() if batch_size >= 4 else None  # (V, C)
        self.kernel = StepKernel(
            w.tok_emb, w.pos_emb, [list(layer) for layer in w.layers], *w.ln_f, w.head,
            head_rows, batch_size, self.n_heads, self.eps,
        )  # fmt: skip
        self.kv, self.mask = self.kernel.kv, self.kernel.mask  # prefill fills them
        self.run_step = self.kernel.forward  # called directly: skips nn.Module's call hooks
        self.steps_run, self.compiled = 0, False
        self.length = 0  # positions filled in the cache
        self.pads: torch.Tensor | None = None  # (B,) left padding of the current window

    def compile_when_due(self, upcoming_steps: int) -> None:
        """Compile the step kernel with TorchScript once this decoder, with ``upcoming_steps``
        more, will have run COMPILE_AFTER_STEPS steps.

        Compiling saves ~60 us a step at GPTMini's size but costs ~20 ms a decoder (~80 ms for
        the first in a process), so a short one-off generation runs faster without it.
        """
        if not self.compiled and self.steps_run + upcoming_steps >= COMPILE_AFTER_STEPS:
            self.kernel = compile_kernel(self.kernel)
            self.run_step = self.kernel.forward
            self.compiled = True

    def fits(self, model: GPTMini, batch_size: int) -> bool:
        """Whether this decoder can serve ``model``, with its current weights, at ``batch_size``."""
        return self.batch_size == batch_size and self.weights is _decode_weights(model)

    def prefill(self, ids: torch.Tensor, pads: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) at positions 0..T-1 -> logits (B, V) of the last one; resets the cache."""
        B, T = ids.shape
        C, nh, hs, eps = self.d_model, self.n_heads, self.head_size, self.eps
        if ids.size(1) > self.max_len:
            raise SamplingError(f"a window of {T} tokens is longer than max_len={self.max_len}")
        if self.batch_size != B:
            raise SamplingError(f"{B} rows given to a decoder built for {self.batch_size}")
        self.pads = pads if pads is not None and bool(pads.any()) else None
        key = torch.arange(self.max_len, device=ids.device)  # (L,)
        visible = (key < T).expand(B, -1)  # (B, L): slots step() may attend to
        mask = None
        if self.pads is None:
            x = F.embedding(ids, self.tok_emb) + self.pos_emb[:T]  # (B, T, C)
        else:
            not_pad = key >= self.pads[:, None]  # (B, L)
            visible = visible & not_pad
            # A padded query sees itself only, so its row of the softmax stays finite.
            i = key[:T]
            eye = i[None, :] == i[:, None]
            mask = ((i[None, :] <= i[:, None]) & (not_pad[:, None, :T] | eye))[:, None]
            pos = (i[None, :] - self.pads[:, None]).clamp_(min=0)  # (B, T)
            x = F.embedding(ids, self.tok_emb) + F.embedding(pos, self.pos_emb)
        hidden = ~visible.repeat_interleave(nh, 0)[:, None, :]  # (B*nh, 1, L)
        self.mask.zero_().masked_fill_(hidden, float("-inf"))
        x = x.view(B * T, C)
        for layer, kv in zip(self.layers, self.kv):
            h = F.layer_norm(x, (C,), layer.ln1_w, layer.ln1_b, eps)
            qkv = _linear(h, layer.qkv_w, layer.qkv_b)  # (B*T, 3C)
            q = qkv[:, :C].view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            kv[:, :, :, :T] = qkv[:, C:].view(B, T, 2, nh, hs).permute(2, 0, 3, 1, 4)
            k, v = kv[0, :, :, :T], kv[1, :, :, :T]  # 2 x (B, nh, T, hs)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0
            )  # (B, nh, T, hs)
            x = x + _linear(y.transpose(1, 2).reshape(B * T, C), layer.proj_w, layer.proj_b)
            h = F.layer_norm(x, (C,), layer.ln2_w, layer.ln2_b, eps)
            h = F.gelu(_linear(h, layer.fc_w, layer.fc_b), approximate="tanh")
            x = x + _linear(h, layer.out_w, layer.out_b)
        self.length = T
        return self.kernel.logits(x.view(B, T, C)[:, -1])  # only the last one is sampled from

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B,) or (B, 1) at the next position -> logits (B, V)."""
        t = self.length
        if t >= self.max_len:
            raise SamplingError(f"the KV cache is full ({self.max_len} positions); prefill again")
        if ids.numel() != self.batch_size:
            raise SamplingError(
                f"{ids.numel()} ids given to a decoder of {self.batch_size} rows; give one per row"
            )
        logits = self.run_step(ids.view(-1), t, self.pads)
        self.length = t + 1
        self.steps_run += 1
        return logits


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) index of each row's maximum (the first one on ties)."""
    if logits.device.type == "cpu":
        # NumPy's vectorised argmax, conversions included, takes ~7 us over 8192 floats where
        # torch's takes ~23 us: 3-4% of a whole decoding step at batch 1.
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


_DECODERS_ATTR = "_pocketgpt_decoders"
_KEPT_DECODERS = 4  # batch sizes whose decoder a model keeps between generate calls


class _Decoders(dict):
    """Batch size -> the KVDecoder a past ``generate`` call left on a model.

    A copy of the model (``copy.deepcopy``, pickle) starts without them: they are buffers and
    compiled kernels (which cannot be copied), not model state.
    """

    def __deepcopy__(self, memo) -> _Decoders:
        return _Decoders()

    def __reduce__(self):
        return _Decoders, ()


def _take_decoder(model: GPTMini, batch_size: int) -> KVDecoder:
    """The decoder a past ``generate`` call left on the model for this batch size, if it is
    still current, else a new one.

    Taking it off the model (an atomic dict pop) keeps concurrent calls from sharing buffers.
    """
    decoders = model.__dict__.setdefault(_DECODERS_ATTR, _Decoders())
    decoder = decoders.pop(batch_size, None)
    if decoder is not None and decoder.fits(model, batch_size):
        return decoder
    if decoder is not None:  # the weights changed: every kept decoder is stale
        decoders.clear()
    return KVDecoder(model, batch_size)


def _keep_decoder(model: GPTMini, decoder: KVDecoder) -> None:
    """Leave ``decoder`` on the model for the next call, keeping the last few batch sizes'.

    A compiled decoder took ~20 ms to compile: a server answering batches of varying size would
    lose that on most requests if only the last one were kept.
    """
    decoders = model.__dict__.setdefault(_DECODERS_ATTR, _Decoders())  # a plain attribute
    decoders[decoder.batch_size] = decoder  # dicts keep insertion order: the newest is last
    for batch_size in list(decoders)[:-_KEPT_DECODERS]:
        decoders.pop(batch_size, None)


def _left_pad(
    prompt_ids: torch.Tensor | Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, T) left-padded with 0, pads (B,) number of padding tokens per row."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise SamplingError(f"prompt_ids has shape {tuple(prompt_ids.shape)}; expected (B, T)")
        rows = None
        ids = prompt_ids.to(device=device, dtype=torch.long)
        pads = torch.zeros(ids.size(0), dtype=torch.long, device=device)
    else:
        rows = [list(r) for r in prompt_ids]
        if not rows:
            raise SamplingError("no prompts given; pass at least one")
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long)
        pads = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
        ids, pads = ids.to(device), pads.to(device)
    if ids.size(1) == 0 or bool((pads == ids.size(1)).any()):
        raise SamplingError("a prompt is empty (0 tokens); give each prompt at least one token")
    real = ids if rows is None else ids[torch.arange(ids.size(1), device=device) >= pads[:, None]]
    lo, hi = int(real.min()), int(real.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise SamplingError(
            f"prompt token id {bad} is outside the model's vocabulary 0..{vocab_size - 1}; "
            "encode prompts with the model's own tokenizer"
        )
    return ids, pads


@torch.inference_mode()
def generate(
    model: GPTMini,
    prompt_ids: torch.Tensor | Sequence[Sequence[int]],
    cfg: SamplingConfig,
    eos_id: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """prompt_ids (B, T), or B lists of ids of any lengths -> new ids (B, n), n <= max_new_tokens.

    Stops early once every row has produced ``eos_id`` (``stop_at_eos``); a row that finished
    first is filled with ``eos_id``. ``on_token`` gets each step's ids (B, 1) as they come.
    """
    max_len = model.config.max_len
    check_sampling(cfg, max_len)
    device = model.tok_emb.weight.device
    prompt, pads = _left_pad(prompt_ids, model.config.vocab_size, device)
    B, T0 = prompt.shape
    if cfg.max_new_tokens == 0:
        return prompt.new_zeros(B, 0)
    ragged = bool(pads.any())
    seq = torch.cat([prompt, prompt.new_zeros(B, cfg.max_new_tokens)], dim=1)  # (B, T0 + N)
    total = T0  # columns of seq filled so far, left padding included
    seq_cols = seq.unbind(1)  # views made once: writing a column is then one copy_
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    stop = eos_id is not None and cfg.stop_at_eos
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    seen = None  # (B, V) tokens present so far, for the repetition penalty
    if cfg.repetition_penalty != 1.0:
        real = (torch.arange(T0, device=device) >= pads[:, None]).long()  # (B, T0) not padding
        counts = prompt.new_zeros(B, model.config.vocab_size).scatter_add_(1, prompt, real)
        seen = counts > 0

    decoder = _take_decoder(model, B)
    if cfg.use_cache:
        decoder.compile_when_due(cfg.max_new_tokens)
    # With the cache, a full context re-prefills max_len - slide + 1 tokens; without, every step
    # re-runs the last max_len tokens.
    window = max_len - cfg.slide + 1 if cfg.use_cache else max_len

    def prefill(n: int) -> torch.Tensor:
        w = min(total, n)
        return decoder.prefill(
            seq[:, total - w : total], (pads - (total - w)).clamp(min=0) if ragged else None
        )

    logits = prefill(max_len)
    n = 0
    for n in range(1, cfg.max_new_tokens + 1):
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        if cfg.temperature <= 0:
            next_id = _argmax(logits)  # (B,)
        else:
            probs = torch.softmax(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p), -1)
            next_id = torch.multinomial(probs, 1, generator=gen)[:, 0]
        if stop and B == 1:
            all_done = int(next_id) == eos_id  # one row: a scalar check, no tensor ops
        elif stop:
            next_id = torch.where(finished, eos_id, next_id)
            finished |= next_id == eos_id
            all_done = bool(finished.all())
        seq_cols[total].copy_(next_id)
        total += 1
        if seen is not None:
            seen[torch.arange(B, device=device), next_id] = True
        if on_token is not None:
            on_token(next_id[:, None])
        if n == cfg.max_new_tokens or (stop and all_done):
            break  # no forward for a token that would never be sampled
        if not cfg.use_cache or decoder.length == max_len:
            logits = prefill(window)
        else:
            logits = decoder.step(next_id)
    _keep_decoder(model, decoder)
    return seq[:, T0 : T0 + n]


class _TextStream:
    """Decodes one row's growing ids and yields only the new, complete text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a UTF-8 character split across tokens: wait for the rest
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new


def generate_rows(
    model: GPTMini,
    tokenizer,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    on_text: Callable[[int, str], None] | None = None,
) -> list[list[int]]:
    """Prompts -> each one's new token ids, cut before ``<eos>``.

    ``on_text(row, text)`` gets each row's new text as soon as it decodes to whole characters.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    for p, row in zip(prompts, ids):
        if not row:
            raise SamplingError(f"prompt {p!r} encodes to no tokens; give a non-empty prompt")
    eos = tokenizer.eos_id
    streams = [_TextStream(tokenizer) for _ in prompts]
    done = [False] * len(prompts)

    def emit(step_ids: torch.Tensor) -> None:  # step_ids (B, 1)
        for row, token in enumerate(step_ids[:, 0].tolist()):
            done[row] = done[row] or (cfg.stop_at_eos and token == eos)
            if not done[row] and (text := streams[row].push(token)):
                on_text(row, text)

    new = generate(model, ids, cfg, eos_id=eos, on_token=emit if on_text else None)
    rows = new.tolist()
    if cfg.stop_at_eos and eos is not None:
        rows = [row[: row.index(eos)] if eos in row else row for row in rows]
    return rows


def generate_text(
    model: GPTMini,
    tokenizer,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Prompts -> their continuations (the text after each prompt, up to ``<eos>``)."""
    return [tokenizer.decode(row) for row in generate_rows(model, tokenizer, prompts, cfg, on_text)]
