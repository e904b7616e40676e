"""GPTMini: a small decoder-only transformer, readable in one sitting.

Token + learned position embeddings, ``num_layers`` pre-LayerNorm blocks of causal multi-head
self-attention (``F.scaled_dot_product_attention``) and a GELU feed-forward, a final LayerNorm and
a language-model head tied to the token embedding.

With targets and gradients on, the head and the cross-entropy run as one fused step
(``linear_cross_entropy``): the loss and its gradient are computed in row chunks that stay in
the CPU cache, instead of several passes over the (B*T, vocab) logits. The head and the
cross-entropy over the vocabulary are about half the FLOPs at GPTMini's default shape, and the
passes over its 64 MB of logits were the largest memory-bound cost of a training step (see
BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    num_layers: int = 4
    max_len: int = 128
    dropout: float = 0.0
    bias: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- fused head + loss

CE_CHUNK_ROWS = 512  # rows of logits per chunk: 512 x 8192 fp32 = 16 MB, stays in the L3 cache


def _ce_chunks(
    logits: torch.Tensor | None,
    targets: torch.Tensor,
    h: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    want_grad: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean cross-entropy of the logits (N, V) against targets (N,), in row chunks.

    ``logits`` None: each chunk's logits are computed from ``h`` (N, C) and ``weight`` (V, C)
    as ``h @ weight.T`` into a scratch buffer, so the (N, V) logits never exist. With
    ``want_grad`` also returns the gradients of the mean loss with respect to h and weight: each
    chunk's softmax minus one-hot is formed in the scratch buffer while it is in cache and
    multiplied out at once, so the (N, V) gradient of the logits never exists either.
    """
    chunk = chunk or CE_CHUNK_ROWS
    n = targets.shape[0]
    v = logits.shape[1] if logits is not None else weight.shape[0]
    device = targets.device
    rows = torch.empty(n, dtype=torch.float32, device=device)
    grad_h = torch.empty_like(h) if want_grad else None
    grad_w = torch.zeros_like(weight) if want_grad else None
    scratch = torch.empty(min(chunk, n), v, dtype=torch.float32, device=device)
    inv_n = 1.0 / n
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        p, t = scratch[: e - s], targets[s:e].unsqueeze(1)
        lg = logits[s:e] if logits is not None else torch.mm(h[s:e], weight.t(), out=p)
        mx = lg.amax(dim=1, keepdim=True)
        picked = lg.gather(1, t)
        torch.sub(lg, mx, out=p)
        p.exp_()
        sumexp = p.sum(dim=1, keepdim=True)
        # loss_i = log(sum_j exp(l_ij - max_i)) + max_i - l_i,target
        rows[s:e] = (sumexp.log() + mx - picked).squeeze(1)
        if want_grad:
            p.mul_(sumexp.reciprocal_().mul_(inv_n))  # softmax / N
            p.scatter_add_(1, t, torch.full_like(t, -inv_n, dtype=p.dtype))  # - one-hot / N
            torch.mm(p, weight, out=grad_h[s:e])
            grad_w.addmm_(p.t(), h[s:e])
    return rows.sum() * inv_n, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """(h, weight, targets) -> mean cross-entropy of h @ weight.T, and the logits if asked.

    The gradient of the loss is computed in the forward pass, chunk by chunk (``_ce_chunks``),
    and only scaled in the backward. The logits, when returned, are for callers that read them;
    a gradient flowing into them (rare) is handled too.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, return_logits):
        logits = torch.mm(h, weight.t()) if return_logits else None
        loss, grad_h, grad_w = _ce_chunks(logits, targets, h, weight, want_grad=True)
        ctx.save_for_backward(h, weight, grad_h, grad_w)
        ctx.set_materialize_grads(False)
        return (loss, logits) if return_logits else loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_logits=None):
        h, weight, grad_h, grad_w = ctx.saved_tensors
        if grad_loss is None:
            grad_h, grad_w = torch.zeros_like(h), torch.zeros_like(weight)
        else:  # out of place: a retained graph may run this backward again
            grad_h, grad_w = grad_h * grad_loss, grad_w * grad_loss
        if grad_logits is not None:
            grad_h.addmm_(grad_logits, weight)
            grad_w.addmm_(grad_logits.t(), h)
        return grad_h, grad_w, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, return_logits: bool = True
):
    """(mean cross-entropy, logits) of the head ``h @ weight.T`` (h (N, C), targets (N,)); only
    the loss with ``return_logits=False`` (then the (N, V) logits are never stored).

    Equal to ``F.cross_entropy(h @ weight.T, targets)`` forward and backward (to float
    rounding), with the loss gradient formed chunk by chunk in cache. Targets must be valid
    class ids (no ignore_index); callers fall back to F.cross_entropy otherwise.
    """
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, return_logits)
    with torch.no_grad():
        logits = torch.mm(h, weight.t()) if return_logits else None
        loss = _ce_chunks(logits, targets, h, weight)[0]
    return (loss, logits) if return_logits else loss


def _fused_head_ok(x: torch.Tensor, targets: torch.Tensor) -> bool:
    """The fused head + loss runs on the CPU in fp32 eager mode. GPUs, autocast, torch.compile
    (which fuses the loss itself), other dtypes and ignored targets (negative ids) take the
    plain path."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()
        and bool((targets >= 0).all())
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # fused q, k, v
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_heads
        q = q.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            past_k, past_v = kv_cache
            k = torch.cat([past_k, k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([past_v, v], dim=2)
        past = k.size(2) - T
        if past == 0:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            # New queries sit at positions past..past+T-1: each sees all cached keys and the new
            # keys up to itself. is_causal would align the mask to the top-left, so build it.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y)), (k, v)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.ff = FeedForward(cfg)

    def forward(self, x, kv_cache=None):
        a, new_cache = self.attn(self.ln1(x), kv_cache)
        x = x + a
        x = x + self.ff(self.ln2(x))
        return x, new_cache


class GPTMini(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
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

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: list | None = None,
        start_pos: int = 0,
    ):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy if targets.

        With ``kv_cache`` (a list with one (k, v) per layer, or empty to start one) the tokens are
        taken to sit at positions ``start_pos..start_pos+T-1``; the list is updated in place.
        """
        B, T = idx.shape
        x = self._hidden(idx, kv_cache, start_pos)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab)
        if _fused_head_ok(x, targets):
            loss, logits = linear_cross_entropy(
                x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1)
            )
            return logits.view(B, T, -1), loss
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy alone: ``forward(idx, targets)[1]`` without keeping the
        (B, T, vocab) logits, which training does not read (the trainer's step calls this)."""
        x = self._hidden(idx)
        if _fused_head_ok(x, targets):
            return linear_cross_entropy(
                x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), False
            )
        logits = self.lm_head(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))

    def _hidden(self, idx: torch.Tensor, kv_cache: list | None = None, start_pos: int = 0):
        """The final LayerNorm's output (B, T, C): everything but the head."""
        B, T = idx.shape
        if start_pos + T > self.config.max_len:
            raise ValueError(
                f"sequence of {start_pos + T} tokens is longer than max_len={self.config.max_len}"
            )
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            layer_cache = kv_cache[i] if kv_cache is not None and i < len(kv_cache) else None
            x, new_cache = block(x, layer_cache)
            if kv_cache is not None:
                if i < len(kv_cache):
                    kv_cache[i] = new_cache
                else:
                    kv_cache.append(new_cache)
        return self.ln_f(x)
