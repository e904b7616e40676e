"""GPTMini: a small decoder-only transformer, readable in one sitting.

Token + learned position embeddings, ``num_layers`` pre-LayerNorm blocks of causal multi-head
self-attention (``F.scaled_dot_product_attention``) and a GELU feed-forward, a final LayerNorm and
a language-model head tied to the token embedding.

One forward serves training and inference. ``model(idx)`` -> logits and ``model(idx, targets)``
-> (logits, loss) run a whole window from position 0. For generation, a ``KVCache``
(``model.new_kv_cache(batch_size)``) keeps every layer's keys and values: a prefill
``model(prompt, input_pos=0, cache=cache)`` fills slots 0..T-1, then each
``model(next_ids, input_pos=t, cache=cache)`` adds one slot and attends over the filled ones.
Rows may be left-padded (``cache.reset(pads)``): padding is masked out of attention and each
row's positions start at 0 at its first real token.

Training's loss without the (B, T, vocab) logits (a fused, chunked head + cross-entropy) is in
``pocketgpt.fused_loss``; ``forward`` computes it the plain way.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketgpt.config import ModelConfig
from pocketgpt.errors import ConfigError


class KVCache:
    """Keys and values of every layer for ``max_len`` slots, allocated once.

    Slot i holds the token at window column i. A cache belongs to one sequence batch at a time:
    ``reset(pads)`` starts a new one, whose rows are left-padded by ``pads`` (B,) tokens. Make
    and use a cache in the same grad mode (e.g. both under ``torch.inference_mode``).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        hs = config.d_model // config.n_heads
        shape = (2, batch_size, config.n_heads, config.max_len, hs)  # (keys | values, B, nh, L, hs)
        self.batch_size, self.max_len = batch_size, config.max_len
        # One tensor per layer, so a layer writes its new keys and values in one copy. Zeros:
        # no slot ever holds garbage.
        self.layers = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)
        ]
        self.pads: torch.Tensor | None = None  # (B,) left padding per row; None: no row padded
        self.real: torch.Tensor | None = None  # (B, L) bool: slot is a real token, not padding

    def reset(self, pads: torch.Tensor | None = None) -> KVCache:
        """Start a new batch of sequences; ``pads`` (B,): each row's number of padding tokens."""
        if pads is not None and not bool(pads.any()):
            pads = None
        self.pads = pads
        self.real = None
        if pads is not None:
            slots = torch.arange(self.max_len, device=pads.device)  # (L,)
            self.real = slots >= pads[:, None]  # (B, L)
        return self


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # fused q, k, v
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: torch.Tensor | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        ``kv``: this layer's cache (2, B, nh, L, hs); x's keys and values are written to slots
        start..start+T-1 and the queries attend over slots 0..start+T-1. ``mask`` (bool, True =
        may attend) is given only where plain causal attention is wrong: padding, or several new
        tokens after cached ones. Without a mask a window is causal and a single new token sees
        every filled slot.
        """
        B, T, C = x.shape
        nh = self.n_heads
        qkv = self.qkv(x).view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        if kv is None:
            q, k, v = qkv.unbind(0)  # 3 x (B, nh, T, hs)
        else:
            end = start + T
            kv[:, :, :, start:end] = qkv[1:]  # this window's keys and values into their slots
            q = qkv[0]  # (B, nh, T, hs)
            k, v = kv[:, :, :, :end].unbind(0)  # 2 x (B, nh, end, hs): the filled slots, views
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and (kv is None or start == 0),
        )  # (B, nh, T, hs)
        y = self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C): heads side by side
        return self.resid_drop(y) if self.training else y  # eval: dropout is a no-op, skip it


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return self.drop(x) if self.training else x  # eval: dropout is a no-op, skip it


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.ff = FeedForward(cfg)

    def forward(self, x, mask=None, kv=None, start=0):
        x = x + self.attn(self.ln1(x), mask, kv, start)
        return x + self.ff(self.ln2(x))


class GPTMini(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError(
                "ModelConfig.vocab_size is None; set it to the tokenizer's vocab_size"
            )
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying

        # GPT-2 initialisation: N(0, 0.02), zero biases, and residual projections scaled by
        # 1/sqrt(2 * num_layers) so the residual stream's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position table is left out by default, as nanoGPT does."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel()
        return n

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """An empty cache for ``batch_size`` rows on this model's device and dtype."""
        w = self.tok_emb.weight
        return KVCache(self.config, batch_size, device=w.device, dtype=w.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        input_pos: int | None = None,
        cache: KVCache | None = None,
    ):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy if targets.

        With a ``cache`` the tokens go to slots input_pos..input_pos+T-1 (see hidden_states).
        """
        logits = self.lm_head(self.hidden_states(idx, input_pos=input_pos, cache=cache))
        if targets is None:
            return logits  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def last_logits(
        self, idx: torch.Tensor, *, input_pos: int | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, vocab) of each row's last token: what sampling needs. The
        head over all T positions of a prefill would cost as much as the blocks."""
        h = self.hidden_states(idx, input_pos=input_pos, cache=cache)  # (B, T, C)
        return self.lm_head(h[:, -1])  # (B, V)

    def hidden_states(
        self, idx: torch.Tensor, *, input_pos: int | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """idx (B, T) -> the final LayerNorm's output (B, T, C): everything but the head.

        Without a cache the tokens are a whole window at positions 0..T-1 (input_pos: a later
        start). With one they are window columns (cache slots) input_pos..input_pos+T-1 (0 if
        None) and attend over every slot before them; a row padded by p tokens
        (``cache.reset``) has its column i at position i - p.
        """
        B, T = idx.shape
        start = input_pos or 0
        end = start + T
        if end > self.config.max_len:
            raise ValueError(
                f"sequence of {end} tokens is longer than max_len={self.config.max_len}"
            )
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"{B} rows given to a KV cache made for {cache.batch_size}")
        pads = cache.pads if cache is not None else None
        if pads is None:
            pos = self.pos_emb.weight[start:end]  # (T, C): positions start..end-1
        else:
            cols = torch.arange(start, end, device=idx.device)  # (T,)
            pos = self.pos_emb((cols - pads[:, None]).clamp(min=0))  # (B, T, C)
        x = self.tok_emb(idx) + pos  # (B, T, C)
        if self.training:  # in eval dropout is a no-op: skip the call (decoding is overhead-bound)
            x = self.drop(x)
        mask = self._attention_mask(cache, start, end)
        kvs = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, kv in zip(self.blocks, kvs):
            x = block(x, mask, kv, start)
        return self.ln_f(x)

    @staticmethod
    def _attention_mask(cache: KVCache | None, start: int, end: int) -> torch.Tensor | None:
        """(B or 1, 1, T, end) bool, True where query column start+i may see key slot j; None
        where the attention's own rule is right (causal from slot 0, or one new token seeing
        all filled slots)."""
        if cache is None:
            return None  # a whole window: causal over its own keys
        real = cache.real  # (B, L) or None
        if real is None and (start == 0 or end - start == 1):
            return None
        if real is not None and end - start == 1:
            return real[:, None, None, :end]  # a view: the new token sees every real slot
        device = cache.layers[0].device
        q = torch.arange(start, end, device=device)[:, None]  # (T, 1) query columns
        k = torch.arange(end, device=device)  # (end,) key slots
        causal = k <= q  # (T, end)
        if real is None:
            return causal[None, None]
        # A padding query sees itself only, so its softmax row stays finite.
        return (causal & (real[:, None, :end] | (k == q)))[:, None]  # (B, 1, T, end)
