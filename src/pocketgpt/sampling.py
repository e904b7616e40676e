"""Text generation with a static KV cache: greedy, temperature, top-k, top-p, repetition penalty.

The prompt runs once (prefill) and fills a preallocated cache of ``max_len`` positions per layer;
each new token then costs one position. ``KVDecoder`` is GPTMini's forward written out for
inference on pre-transposed weights with as few small ops as possible: at GPTMini's size a step
is bound by per-op overhead, not arithmetic. ``tests/test_generate.py`` checks it against
``GPTMini.forward`` (logits within 1e-5).

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


def _linear_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    if b is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(b, x, w, out=out)


def _add_linear_(acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """acc += x @ w + b, in place: a residual connection."""
    if b is None:
        acc.addmm_(x, w)
    else:  # (x @ w + b) first: the model's own rounding, which the tests hold us to
        acc.add_(torch.addmm(b, x, w))


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


class KVDecoder:
    """GPTMini inference with a static KV cache: per layer (2, B, heads, max_len, head_size).

    ``prefill(ids)`` runs a window from position 0 and returns the last position's logits;
    ``step(ids)`` appends one token per row and returns its logits. ``pads`` (B,) gives each
    row's number of left-padding tokens in the window, masked out of attention. This is
    GPTMini.forward rearranged for speed; the tests hold it to 1e-5 of it.

    At GPTMini's size a one-token step costs what its torch calls cost to dispatch and what
    its weights cost to read, not arithmetic, so ``step`` makes as few calls as it can: it
    writes into buffers allocated once, the views it needs are made once (per position, on
    first use), and attention always spans all ``max_len`` cache slots under an additive mask
    (0 on filled slots, -inf elsewhere) instead of slicing the cache to the current length.
    ``generate`` keeps the last decoder on the model for the next call, so repeated calls skip
    all of that set-up.
    """

    def __init__(self, model: GPTMini, batch_size: int):
        cfg = model.config
        self.batch_size = batch_size
        self.n_heads, self.d_model, self.max_len = cfg.n_heads, cfg.d_model, cfg.max_len
        self.head_size = cfg.d_model // cfg.n_heads
        self.eps = model.ln_f.eps
        self.weights = _decode_weights(model)
        self.tok_emb, self.pos_emb, self.layers, self.ln_f, self.head = self.weights
        # The output layer reads 4 MB of weights a step at the default shape. x @ (C, V) runs as
        # a matrix-vector product at one row, the fastest there; from 4 rows up that path is 2x
        # slower than (V, C) @ x.T on a cold cache (BENCHMARKS.md, section (c)).
        self.head_rows = model.lm_head.weight.detach() if batch_size >= 4 else None  # (V, C)
        B, C, nh, L, hs = batch_size, self.d_model, self.n_heads, self.max_len, self.head_size
        like = dict(dtype=self.tok_emb.dtype, device=self.tok_emb.device)
        # Zeros, not empty: masked slots still enter the products (with weight 0), so they must
        # hold finite numbers.
        self.kv = [torch.zeros(2, B, nh, L, hs, **like) for _ in self.layers]  # keys, values
        # the same memory as (B*nh, hs, L) keys and (B*nh, L, hs) values
        self.keys_t = [kv[0].view(B * nh, L, hs).transpose(1, 2) for kv in self.kv]
        self.values = [kv[1].view(B * nh, L, hs) for kv in self.kv]
        self.mask = torch.zeros(B * nh, 1, L, **like)  # set by prefill, opened slot by slot
        self.length = 0  # positions filled in the cache
        self.pads: torch.Tensor | None = None  # (B,) left padding of the current window
        # step()'s buffers and their views
        self.x = torch.empty(B, C, **like)  # the residual stream
        self.qkv = torch.empty(B, 3 * C, **like)
        self.new_kv = self.qkv[:, C:].view(B, 2, nh, hs).transpose(0, 1)  # (2, B, nh, hs)
        # q as (B*nh, 1, hs) is a view of qkv at one row only; more rows need a copy per step
        self.q = self.qkv[:, :C].view(nh, 1, hs) if B == 1 else None
        self.scores = torch.empty(B * nh, 1, L, **like)
        self.y = torch.empty(B, C, **like)  # attention output, heads side by side
        self.y_heads = self.y.view(B * nh, 1, hs)
        # per position t, made on first use: (mask column, pos_emb row, kv slot of each layer)
        self.at: list[tuple | None] = [None] * L

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
        return self._logits(x.view(B, T, C)[:, -1])  # only the last position is sampled from

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B,) or (B, 1) at the next position -> logits (B, V)."""
        t = self.length
        if t >= self.max_len:
            raise SamplingError(f"the KV cache is full ({self.max_len} positions); prefill again")
        B, C, nh, hs, eps = self.batch_size, self.d_model, self.n_heads, self.head_size, self.eps
        if ids.numel() != B:
            raise SamplingError(
                f"{ids.numel()} ids given to a decoder of {B} rows; give one per row"
            )
        at = self.at[t]
        if at is None:
            at = self.at[t] = (
                self.mask[:, :, t],
                self.pos_emb[t],
                [kv[..., t, :] for kv in self.kv],
            )
        mask_slot, pos_row, kv_slots = at
        x = self.x
        torch.index_select(self.tok_emb, 0, ids.view(B), out=x)  # (B, C)
        x.add_(pos_row if self.pads is None else F.embedding(t - self.pads, self.pos_emb))
        mask_slot.zero_()  # slot t gets this token's keys below: visible from now on
        # torch.layer_norm, not F.layer_norm: the same op without a Python wrapper, ~1.5 us less
        for layer, kv_slot, keys_t, values in zip(self.layers, kv_slots, self.keys_t, self.values):
            h = torch.layer_norm(x, (C,), layer.ln1_w, layer.ln1_b, eps)
            _linear_into(self.qkv, h, layer.qkv_w, layer.qkv_b)  # (B, 3C)
            kv_slot.copy_(self.new_kv)  # this step's keys and values into slot t
            q = self.q if self.q is not None else self.qkv[:, :C].reshape(B * nh, 1, hs)
            torch.baddbmm(self.mask, q, keys_t, out=self.scores)  # (B*nh, 1, L)
            torch.bmm(torch.softmax(self.scores, dim=-1), values, out=self.y_heads)
            _add_linear_(x, self.y, layer.proj_w, layer.proj_b)
            h = torch.layer_norm(x, (C,), layer.ln2_w, layer.ln2_b, eps)
            h = F.gelu(_linear(h, layer.fc_w, layer.fc_b), approximate="tanh")
            _add_linear_(x, h, layer.out_w, layer.out_b)
        self.length = t + 1
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C) -> logits (B, V), a new tensor."""
        x = torch.layer_norm(x, (self.d_model,), self.ln_f[0], self.ln_f[1], self.eps)
        if self.head_rows is not None:
            return (self.head_rows @ x.t()).t()  # (V, B) -> (B, V), a transposed view
        return x @ self.head


_DECODER_ATTR = "_pocketgpt_decoder"


def _take_decoder(model: GPTMini, batch_size: int) -> KVDecoder:
    """The decoder the last ``generate`` call left on the model if it still fits, else a new one.

    Taking it off the model (an atomic dict pop) keeps concurrent calls from sharing buffers.
    """
    decoder = model.__dict__.pop(_DECODER_ATTR, None)
    if decoder is not None and decoder.fits(model, batch_size):
        return decoder
    return KVDecoder(model, batch_size)


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
            next_id = logits.argmax(dim=-1)  # (B,)
        else:
            probs = torch.softmax(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p), -1)
            next_id = torch.multinomial(probs, 1, generator=gen)[:, 0]
        if stop and B == 1:
            all_done = int(next_id) == eos_id  # one row: a scalar check, no tensor ops
        elif stop:
            next_id = torch.where(finished, eos_id, next_id)
            finished |= next_id == eos_id
            all_done = bool(finished.all())
        seq[:, total] = next_id
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
    model.__dict__[_DECODER_ATTR] = decoder  # for the next call (a plain attribute)
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
