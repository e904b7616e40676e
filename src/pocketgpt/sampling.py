"""Token generation with a KV cache: greedy, temperature, top-k and top-p sampling.

The prompt is run once (prefill) to fill the cache, then one token per step. A prompt longer
than the model's context keeps only its last ``max_len - 1`` tokens; when the cache is full the
window slides: the last ``max_len // 2`` tokens are re-run as a fresh prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pocketgpt.model import GPTMini


@dataclass
class SamplingConfig:
    max_new_tokens: int = 40
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True


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


def _apply_repetition_penalty(logits, generated, penalty):
    if penalty == 1.0 or generated.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, generated)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, generated, seen)


@torch.inference_mode()
def generate(
    model: GPTMini,
    prompt_ids: torch.Tensor,
    cfg: SamplingConfig,
    eos_id: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """prompt_ids (B, T) -> new token ids (B, <= max_new_tokens), with a KV cache."""
    model.eval()
    max_len = model.config.max_len
    device = prompt_ids.device
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    context = prompt_ids[:, -(max_len - 1) :] if prompt_ids.size(1) >= max_len else prompt_ids
    B = context.size(0)
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache: list = []
    logits = model(context, kv_cache=cache)[:, -1, :]
    pos = context.size(1)
    for _ in range(cfg.max_new_tokens):
        logits = _apply_repetition_penalty(
            logits.float(), torch.cat([prompt_ids, out], dim=1), cfg.repetition_penalty
        )
        if cfg.temperature <= 0:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            probs = torch.softmax(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p), -1)
            next_id = torch.multinomial(probs, 1, generator=gen)
        if eos_id is not None and cfg.stop_at_eos:
            next_id = torch.where(finished[:, None], torch.full_like(next_id, eos_id), next_id)
            finished |= next_id[:, 0] == eos_id
        out = torch.cat([out, next_id], dim=1)
        if on_token is not None:
            on_token(next_id)
        if eos_id is not None and cfg.stop_at_eos and bool(finished.all()):
            break
        if pos >= max_len:  # the cache is full: slide, re-running the recent half as a prefill
            keep = torch.cat([context, out], dim=1)[:, -(max_len // 2) :]
            cache = []
            logits = model(keep, kv_cache=cache)[:, -1, :]
            pos = keep.size(1)
        else:
            logits = model(next_id, kv_cache=cache, start_pos=pos)[:, -1, :]
            pos += 1
    return out
