"""The language-model head and cross-entropy fused into one chunked step, for CPU training.

``lm_loss(model, idx, targets)`` is GPTMini's mean next-token loss without the (B*T, vocab)
logits: the head ``h @ weight.T`` and the cross-entropy run in row chunks that stay in the CPU
cache, and the loss gradient is formed chunk by chunk in the same pass instead of several passes
over the logits. The head and the cross-entropy over the vocabulary are about half the FLOPs at
GPTMini's default shape, and the passes over its 64 MB of logits were the largest memory-bound
cost of a training step (see BENCHMARKS.md). Where the fused step does not apply (GPU, autocast,
torch.compile, other dtypes, ignored targets) ``lm_loss`` is plain ``F.cross_entropy``. The
head is whatever the model has (tied or its own weight), with the model's logit softcap
(``cap * tanh(logits / cap)``) applied inside the chunks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pocketgpt.model import GPTMini

CE_CHUNK_ROWS = 512  # rows of logits per chunk: 512 x 8192 fp32 = 16 MB, stays in the L3 cache


def _ce_chunks(
    logits: torch.Tensor | None,
    targets: torch.Tensor,
    h: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    want_grad: bool = False,
    chunk: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean cross-entropy of the logits (N, V) against targets (N,), in row chunks.

    ``logits`` None: each chunk's logits are computed from ``h`` (N, C) and ``weight`` (V, C)
    as ``h @ weight.T`` into a scratch buffer, so the (N, V) logits never exist. With
    ``want_grad`` also returns the gradients of the mean loss with respect to h and weight: each
    chunk's softmax minus one-hot is formed in the scratch buffer while it is in cache and
    multiplied out at once, so the (N, V) gradient of the logits never exists either.
    ``softcap``: the chunk's logits become cap * tanh(logits / cap) (``logits`` given: already
    capped), and the gradient goes through the tanh.
    """
    chunk = chunk or CE_CHUNK_ROWS
    n = targets.shape[0]
    v = logits.shape[1] if logits is not None else weight.shape[0]
    device = targets.device
    rows = torch.empty(n, dtype=torch.float32, device=device)
    grad_h = torch.empty_like(h) if want_grad else None
    grad_w = torch.zeros_like(weight) if want_grad else None
    scratch = torch.empty(min(chunk, n), v, dtype=torch.float32, device=device)
    capping = softcap is not None and logits is None
    tanh_scratch = torch.empty_like(scratch) if capping and want_grad else None
    inv_n = 1.0 / n
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        p, t = scratch[: e - s], targets[s:e].unsqueeze(1)
        lg = logits[s:e] if logits is not None else torch.mm(h[s:e], weight.t(), out=p)
        if capping:  # lg is p: cap * tanh(lg / cap) in place, the tanh kept for the gradient
            th = p.div_(softcap).tanh_()
            if tanh_scratch is not None:
                th = tanh_scratch[: e - s].copy_(th)
            lg = p.mul_(softcap) if tanh_scratch is None else torch.mul(th, softcap, out=p)
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
            if capping:  # d(cap * tanh(z / cap)) / dz = 1 - tanh²
                p.mul_(th.square_().neg_().add_(1.0))
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
    def forward(ctx, h, weight, targets, return_logits, chunk, softcap=None):
        logits = torch.mm(h, weight.t()) if return_logits else None
        loss, grad_h, grad_w = _ce_chunks(logits, targets, h, weight, True, chunk, softcap)
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
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    return_logits: bool = True,
    chunk: int | None = None,
    softcap: float | None = None,
):
    """(mean cross-entropy, logits) of the head ``h @ weight.T`` (h (N, C), targets (N,)); only
    the loss with ``return_logits=False`` (then the (N, V) logits are never stored).

    Equal to ``F.cross_entropy(h @ weight.T, targets)`` forward and backward (to float
    rounding), with the loss gradient formed chunk by chunk in cache. Targets must be valid
    class ids (no ignore_index); callers fall back to F.cross_entropy otherwise. ``chunk``: rows
    per chunk (default CE_CHUNK_ROWS). ``softcap``: the logits are cap * tanh(h @ weight.T / cap).
    """
    if softcap is not None and return_logits:
        # Capped logits asked for as well: autograd's tanh (the fused step returns raw logits).
        logits = softcap * torch.tanh(torch.mm(h, weight.t()) / softcap)
        return F.cross_entropy(logits, targets), logits
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, return_logits, chunk, softcap)
    with torch.no_grad():
        logits = torch.mm(h, weight.t()) if return_logits else None
        loss = _ce_chunks(logits, targets, h, weight, chunk=chunk, softcap=softcap)[0]
    return (loss, logits) if return_logits else loss


def fused_ok(h: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether the fused head + loss applies: the CPU in fp32 eager mode. GPUs, autocast,
    torch.compile (which fuses the loss itself), other dtypes and ignored targets (negative
    ids) take the plain path."""
    return (
        h.device.type == "cpu"
        and h.dtype == torch.float32
        and not torch.is_autocast_enabled(h.device.type)
        and not torch.compiler.is_compiling()
        and bool((targets >= 0).all())
    )


def lm_loss(
    model: GPTMini, idx: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on idx (B, T) against targets (B, T).

    Equal to ``model(idx, targets)[1]``, but the (B, T, vocab) logits are never stored, which
    training, reading only the loss, does not need. ``chunk``: see linear_cross_entropy.
    """
    h = model.hidden_states(idx)  # (B, T, C)
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)  # (B*T, C), (B*T,)
    if fused_ok(h, targets):
        cap = model.config.logit_softcap
        return linear_cross_entropy(h, model.lm_head.weight, targets, False, chunk, cap)
    return F.cross_entropy(model.logits(h).float(), targets)
