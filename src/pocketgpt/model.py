"""GPTMini: a small decoder-only transformer, readable in one sitting.

By default GPT-2's design: token + learned position embeddings, ``num_layers`` pre-LayerNorm
blocks of causal multi-head self-attention (``F.scaled_dot_product_attention``) and a GELU
feed-forward, a final LayerNorm and a language-model head tied to the token embedding.
``ModelConfig`` selects the variants: positions (learned table, RoPE on queries and keys, or an
ALiBi distance penalty on the scores), RMSNorm, ReLU² or SwiGLU, QK-norm, zero-initialised
output projections, a tanh softcap on the logits and an untied head. Every variant runs through
the same forward and KV cache.

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

from pocketgpt.config import Activation, ModelConfig, Norm, Position
from pocketgpt.errors import ConfigError

NORM_EPS = 1e-5  # LayerNorm's and RMSNorm's epsilon (LayerNorm's default)


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


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The block's normalisation: LayerNorm (with a bias if cfg.bias) or RMSNorm (weight only)."""
    if cfg.norm == Norm.rmsnorm:
        return nn.RMSNorm(cfg.d_model, eps=NORM_EPS)
    return nn.LayerNorm(cfg.d_model, eps=NORM_EPS, bias=cfg.bias)


def rope_angles(positions: torch.Tensor, head_size: int, base: float) -> torch.Tensor:
    """positions (..., T) -> rotation angles (..., T, hs/2): position * base^(-2i/hs)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, device=positions.device) / head_size)
    return positions[..., None].float() * inv_freq  # (..., T, hs/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by the angles whose cos and sin are (B or 1, 1, T, hs/2).

    Pairs are (i, i + hs/2), the rotate-half layout of GPT-NeoX and Hugging Face's Llama.
    """
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """(nh,) ALiBi's head slopes: the geometric series 2^(-8/n), 2^(-16/n), ... for n a power of
    two; otherwise those of the power of two below, then every other one of the power above."""

    def series(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    below = 2 ** math.floor(math.log2(n_heads))
    slopes = series(below) + series(2 * below)[0::2][: n_heads - below]
    return torch.tensor(slopes)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0
        self.n_heads = cfg.n_heads
        self.qk_norm = cfg.qk_norm
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
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        ``kv``: this layer's cache (2, B, nh, L, hs); x's keys and values are written to slots
        start..start+T-1 and the queries attend over slots 0..start+T-1. ``mask`` (bool, True =
        may attend; or float, added to the scores: ALiBi's penalty) is given only where plain
        causal attention is wrong: padding, several new tokens after cached ones, ALiBi. Without
        a mask a window is causal and a single new token sees every filled slot. ``rope``: (cos,
        sin) of the new tokens' angles; the cache holds keys already rotated.
        """
        B, T, C = x.shape
        nh = self.n_heads
        qkv = self.qkv(x).view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = qkv.unbind(0)  # 3 x (B, nh, T, hs)
        if self.qk_norm:
            q, k = (
                F.rms_norm(q, (q.size(-1),), eps=NORM_EPS),
                F.rms_norm(k, (k.size(-1),), eps=NORM_EPS),
            )
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            end = start + T
            # This window's keys and values into their slots: one copy while k is still qkv's.
            if rope is None and not self.qk_norm:
                kv[:, :, :, start:end] = qkv[1:]
            else:
                kv[0, :, :, start:end], kv[1, :, :, start:end] = k, v
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
        self.activation = cfg.activation
        # SwiGLU's fc computes gate and up at once: rows 0..d_ff-1 the gate, d_ff.. the up.
        width = 2 * cfg.d_ff if cfg.activation == Activation.swiglu else cfg.d_ff
        self.fc = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, d_ff), SwiGLU (B, T, 2 * d_ff)
        if self.activation == Activation.gelu:
            h = F.gelu(h, approximate="tanh")
        elif self.activation == Activation.relu2:
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        x = self.proj(h)
        return self.drop(x) if self.training else x  # eval: dropout is a no-op, skip it


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = make_norm(cfg)
        self.ff = FeedForward(cfg)

    def forward(self, x, mask=None, kv=None, start=0, rope=None):
        x = x + self.attn(self.ln1(x), mask, kv, start, rope)
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
        # Only learned positions have a table; RoPE and ALiBi compute theirs from the positions.
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model) if self.learned_positions else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # weight tying
        if cfg.position == Position.alibi:  # a buffer: moves with .to(), not in the state dict
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)

        # GPT-2 initialisation: N(0, 0.02), zero biases, and residual projections scaled by
        # 1/sqrt(2 * num_layers) so the residual stream's variance does not grow with depth
        # (zero_init_proj: start them at 0, so each block begins as the identity).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @property
    def learned_positions(self) -> bool:
        return self.config.position == Position.learned

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
        if non_embedding and self.pos_emb is not None:
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
        logits = self.logits(self.hidden_states(idx, input_pos=input_pos, cache=cache))
        if targets is None:
            return logits  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head: final hidden states (..., C) -> logits (..., vocab), softcapped if asked."""
        logits = self.lm_head(h)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def last_logits(
        self, idx: torch.Tensor, *, input_pos: int | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, vocab) of each row's last token: what sampling needs. The
        head over all T positions of a prefill would cost as much as the blocks."""
        h = self.hidden_states(idx, input_pos=input_pos, cache=cache)  # (B, T, C)
        return self.logits(h[:, -1])  # (B, V)

    def hidden_states(
        self, idx: torch.Tensor, *, input_pos: int | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """idx (B, T) -> the final norm's output (B, T, C): everything but the head.

        Without a cache the tokens are a whole window at positions 0..T-1 (input_pos: a later
        start). With one they are window columns (cache slots) input_pos..input_pos+T-1 (0 if
        None) and attend over every slot before them; a row padded by p tokens
        (``cache.reset``) has its column i at position i - p. ``max_len`` bounds the cache's
        slots, and with learned positions the positions too; RoPE and ALiBi windows without a
        cache may be longer.
        """
        B, T = idx.shape
        start = input_pos or 0
        end = start + T
        limit = cache.max_len if cache is not None else self.config.max_len
        if end > limit and (cache is not None or self.learned_positions):
            raise ValueError(f"sequence of {end} tokens is longer than max_len={limit}")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"{B} rows given to a KV cache made for {cache.batch_size}")
        pads = cache.pads if cache is not None else None
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.learned_positions:
            if pads is None:
                pos = self.pos_emb.weight[start:end]  # (T, C): positions start..end-1
            else:
                cols = torch.arange(start, end, device=idx.device)  # (T,)
                pos = self.pos_emb((cols - pads[:, None]).clamp(min=0))  # (B, T, C)
            x = x + pos
        elif self.config.position == Position.rope:
            positions = torch.arange(start, end, device=idx.device)  # (T,)
            if pads is not None:
                positions = (positions - pads[:, None]).clamp(min=0)  # (B, T)
            angles = rope_angles(positions, self.config.head_size, self.config.rope_base)
            angles = angles.view(-1, 1, T, angles.size(-1))  # (B or 1, 1, T, hs/2)
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        if self.training:  # in eval dropout is a no-op: skip the call (decoding is overhead-bound)
            x = self.drop(x)
        mask = self._attention_mask(cache, start, end)
        if self.config.position == Position.alibi:
            first_key = 0 if cache is not None else start  # without a cache: the window's keys
            mask = self._alibi_bias(mask, start, end, first_key, x.dtype)
        kvs = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, kv in zip(self.blocks, kvs):
            x = block(x, mask, kv, start, rope)
        return self.ln_f(x)

    def _alibi_bias(
        self,
        mask: torch.Tensor | None,
        start: int,
        end: int,
        first_key: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """(B or 1, nh, T, S) float, S keys from column first_key: -slope * (query column - key
        column) where the query may attend (``mask``, or causal where None), -inf elsewhere.
        Padding shifts a row's columns and positions alike, so distances in columns are
        distances in positions."""
        slopes = self.alibi_slopes
        q = torch.arange(start, end, device=slopes.device)[:, None]  # (T, 1) query columns
        k = torch.arange(first_key, end, device=slopes.device)  # (S,) key columns
        allowed = (k <= q)[None, None] if mask is None else mask  # (B or 1, 1, T, S)
        distance = (q - k).to(dtype)  # (T, S)
        bias = -slopes.to(dtype)[:, None, None] * distance  # (nh, T, S)
        return bias.masked_fill(~allowed, float("-inf"))  # (B or 1, nh, T, S)

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
