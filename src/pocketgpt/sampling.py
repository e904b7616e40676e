"""Text generation: greedy, temperature, top-k, top-p, repetition penalty, batches, streaming.

This module is the sampling policy only; the model does the inference. The prompt runs once
(prefill) into a ``KVCache`` of ``max_len`` slots per layer, then each new token is one call of
the model's forward on that token (``model.last_logits(ids, input_pos=, cache=)``). Each
``generate`` call allocates its own cache, so concurrent calls on one model share nothing.

The model is anything with GPTMini's inference interface: ``config``, ``device``,
``new_kv_cache(B)`` (a cache with ``reset(pads)``) and ``last_logits``. That is ``GPTMini``, or
``pocketgpt.native.NativeGPT`` (the C++ engine): either way the policy here is the same code.

Context limit: a prompt longer than ``max_len`` keeps its last ``max_len`` tokens (truncated
from the left). When the sequence outgrows the context the window slides. With ``slide=1`` (the
default) every further token is predicted from exactly the last ``max_len`` tokens, as
recomputing without a cache would: a fresh prefill per token, exact but slower. ``slide=N``
moves the window N tokens at once, so one prefill serves N tokens: faster, but right after a
slide the model sees only ``max_len - N + 1`` tokens. ``use_cache=False`` re-runs the whole
window for every token (a reference, and slower).

Batches: prompts of different lengths are left-padded; padding is masked out of attention and
each row's positions start at 0 at its first real token, so a row gets the same tokens alone or
in a batch (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pocketgpt.config import SamplingConfig
from pocketgpt.errors import SamplingError
from pocketgpt.model import GPTMini, KVCache


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


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) index of each row's maximum (the first one on ties)."""
    if logits.device.type == "cpu":
        # NumPy's vectorised argmax, conversions included, takes ~7 us over 8192 floats where
        # torch's takes ~23 us: a few percent of a whole decoding step at batch 1.
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def _next_logits(model: GPTMini, ids: torch.Tensor, input_pos: int, cache: KVCache):
    """ids (B, T) into cache slots input_pos.. -> logits (B, V) of the last one."""
    return model.last_logits(ids, input_pos=input_pos, cache=cache)


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
    cfg.check(max_len)
    device = model.device
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

    cache = model.new_kv_cache(B)  # this call's own: never shared with a concurrent one
    filled = 0  # cache slots holding this window's tokens
    # With the cache, a full context re-prefills max_len - slide + 1 tokens; without, every step
    # re-runs the last max_len tokens.
    window = max_len - cfg.slide + 1 if cfg.use_cache else max_len

    def prefill(n: int) -> torch.Tensor:
        """Start the cache over with the last min(total, n) tokens -> their last logits."""
        nonlocal filled
        filled = min(total, n)
        cache.reset((pads - (total - filled)).clamp(min=0) if ragged else None)
        return _next_logits(model, seq[:, total - filled : total], 0, cache)

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
            try:
                next_id = torch.multinomial(probs, 1, generator=gen)[:, 0]
            except RuntimeError:  # NaN or inf probabilities: only a broken model gives them
                raise SamplingError(
                    "the model's logits are not finite (NaN or inf), so there is nothing to "
                    "sample from; check the model's weights (e.g. a run that skipped NaN losses)"
                ) from None
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
        if not cfg.use_cache or filled == max_len:
            logits = prefill(window)
        else:
            logits = _next_logits(model, seq[:, total - 1 : total], filled, cache)
            filled += 1
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
