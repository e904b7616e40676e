"""One decoding step of GPTMini, compiled by TorchScript where it can be.

``pocketgpt.sampling.KVDecoder`` keeps its cache and buffers in a ``StepKernel`` and runs each
new token through it. At GPTMini's size a one-token step is ~60 small torch ops, and going back
to Python between them is a good part of its cost; TorchScript runs them in one call.

No ``from __future__ import annotations`` here: TorchScript reads the attribute annotations
below as types, not strings.
"""

import torch


class StepKernel(torch.nn.Module):
    """KVDecoder.step's arithmetic, and the buffers it works in.

    Written in the subset of Python that TorchScript compiles, and compiled when it can be
    (``compile_kernel``): one call then runs the step's ~60 torch ops without going back to
    Python between them. Where TorchScript is unavailable the same code runs as plain Python.
    Each decoder has its own kernel: the weights are shared, the buffers are its own.
    """

    # attribute types TorchScript cannot infer from a value (None, or a list holding None)
    layers: list[list[torch.Tensor | None]]
    kv: list[torch.Tensor]  # per layer (2, B, nh, L, hs): keys, values
    keys_t: list[torch.Tensor]  # the same memory as (B*nh, hs, L) keys
    values: list[torch.Tensor]  # and as (B*nh, L, hs) values
    ln_f_b: torch.Tensor | None
    head_rows: torch.Tensor | None
    q: torch.Tensor | None

    def __init__(
        self,
        tok_emb: torch.Tensor,  # (V, C)
        pos_emb: torch.Tensor,  # (max_len, C)
        layers: list[list[torch.Tensor | None]],  # each _Layer as a list: biases may be None
        ln_f_w: torch.Tensor,
        ln_f_b: torch.Tensor | None,
        head: torch.Tensor,  # (C, V)
        head_rows: torch.Tensor | None,  # (V, C), to use instead of head when given
        batch_size: int,
        n_heads: int,
        eps: float,
    ):
        super().__init__()
        B, C, nh, L = batch_size, tok_emb.size(1), n_heads, pos_emb.size(0)
        hs = C // nh
        self.tok_emb, self.pos_emb, self.layers = tok_emb, pos_emb, layers
        self.ln_f_w, self.ln_f_b, self.head, self.head_rows = ln_f_w, ln_f_b, head, head_rows
        self.batch_size, self.d_model, self.n_heads, self.eps = B, C, nh, eps
        dtype, device = tok_emb.dtype, tok_emb.device
        # Zeros, not empty: masked slots still enter the products (with weight 0), so they must
        # hold finite numbers.
        self.kv, self.keys_t, self.values = [], [], []
        for _ in range(len(layers)):
            kv = torch.zeros([2, B, nh, L, hs], dtype=dtype, device=device)
            self.kv.append(kv)
            self.keys_t.append(kv[0].view(B * nh, L, hs).transpose(1, 2))
            self.values.append(kv[1].view(B * nh, L, hs))
        # (B*nh, 1, L) additive attention mask: set by prefill, opened slot by slot
        self.mask = torch.zeros([B * nh, 1, L], dtype=dtype, device=device)
        self.x = torch.empty([B, C], dtype=dtype, device=device)  # the residual stream
        self.qkv = torch.empty([B, 3 * C], dtype=dtype, device=device)
        self.new_kv = self.qkv[:, C:].view(B, 2, nh, hs).transpose(0, 1)  # (2, B, nh, hs)
        # q as (B*nh, 1, hs) is a view of qkv at one row only; more rows need a copy per step
        self.q = self.qkv[:, :C].view(nh, 1, hs) if B == 1 else None
        self.scores = torch.empty([B * nh, 1, L], dtype=dtype, device=device)
        self.y = torch.empty([B, C], dtype=dtype, device=device)  # attention output, by head
        self.y_heads = self.y.view(B * nh, 1, hs)

    def forward(self, ids: torch.Tensor, t: int, pads: torch.Tensor | None) -> torch.Tensor:
        """ids (B,) at position t (less each row's ``pads``) -> logits (B, V)."""
        B, C, nh = self.batch_size, self.d_model, self.n_heads
        x = self.x
        torch.index_select(self.tok_emb, 0, ids, out=x)  # (B, C)
        if pads is None:
            x.add_(self.pos_emb[t])
        else:
            x.add_(torch.index_select(self.pos_emb, 0, t - pads))
        self.mask.select(2, t).zero_()  # slot t gets this token's keys below: visible from now
        for i in range(len(self.layers)):
            w = self.layers[i]
            ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b = w[0], w[1], w[2], w[3], w[4], w[5]
            ln2_w, ln2_b, fc_w, fc_b, out_w, out_b = w[6], w[7], w[8], w[9], w[10], w[11]
            assert ln1_w is not None and qkv_w is not None and proj_w is not None
            assert ln2_w is not None and fc_w is not None and out_w is not None
            h = torch.layer_norm(x, [C], ln1_w, ln1_b, self.eps)
            if qkv_b is None:
                torch.mm(h, qkv_w, out=self.qkv)
            else:
                torch.addmm(qkv_b, h, qkv_w, out=self.qkv)  # (B, 3C)
            self.kv[i].select(3, t).copy_(self.new_kv)  # this step's keys and values: slot t
            q = self.q
            if q is None:
                q = self.qkv[:, :C].reshape(B * nh, 1, C // nh)
            torch.baddbmm(self.mask, q, self.keys_t[i], out=self.scores)  # (B*nh, 1, L)
            torch.bmm(torch.softmax(self.scores, dim=-1), self.values[i], out=self.y_heads)
            # residuals: (y @ w + b) first, then the sum: the model's own rounding
            if proj_b is None:
                x.addmm_(self.y, proj_w)
            else:
                x.add_(torch.addmm(proj_b, self.y, proj_w))
            h = torch.layer_norm(x, [C], ln2_w, ln2_b, self.eps)
            h = torch.mm(h, fc_w) if fc_b is None else torch.addmm(fc_b, h, fc_w)
            h = torch.nn.functional.gelu(h, approximate="tanh")
            if out_b is None:
                x.addmm_(h, out_w)
            else:
                x.add_(torch.addmm(out_b, h, out_w))
        return self.logits(x)

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C) -> logits (B, V), a new tensor."""
        x = torch.layer_norm(x, [self.d_model], self.ln_f_w, self.ln_f_b, self.eps)
        head_rows = self.head_rows
        if head_rows is not None:
            return torch.mm(head_rows, x.t()).t()  # (V, B) -> (B, V), a transposed view
        return torch.mm(x, self.head)


def compile_kernel(kernel: StepKernel) -> StepKernel:
    """The kernel compiled by TorchScript, or as it is where that fails.

    TorchScript is deprecated in torch 2.x, but nothing replaces it here: ``torch.compile`` made
    this step slower, after 19 s of compiling; TorchScript takes ~20 ms and makes a whole
    generation ~1.13x faster at batch 1 (BENCHMARKS.md, section (c)).
    """
    # Its DeprecationWarning is left alone: hidden by default, and suppressing it here would
    # change the process-wide warning filters under concurrent callers.
    try:
        return torch.jit.script(kernel)
    except Exception:  # no TorchScript in this torch, or it rejects the code: plain Python
        return kernel
