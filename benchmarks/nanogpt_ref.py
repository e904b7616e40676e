"""The bare reference: a GPT and its training loop written the way nanoGPT's model.py/train.py are.

Plain PyTorch and nothing else: a fused QKV projection, ``F.scaled_dot_product_attention``
(causal), pre-LayerNorm blocks with a tanh-GELU MLP (GPTMini's activation, so the math is the
same), learned positions, a language-model head tied to the token embedding, GPT-2
initialisation, ``F.cross_entropy`` on the full logits, ``torch.optim.AdamW`` with its default
implementation (no ``fused``/``foreach`` argument), weight decay on matrices only, gradient
clipping at 1.0, a linear warm-up + cosine learning rate, random windows drawn from a memmapped
token array (re-opened per batch, as nanoGPT's ``get_batch`` does), eager mode, ``loss.item()``
only at log steps. No framework: no config system, tracking, checkpoints or progress bar.

Used by ``bench_train.py`` (speed) and ``bench_convergence.py`` (time to a validation bpb); runs
on its own too::

    python benchmarks/nanogpt_ref.py --tokens .cache/pocketgpt/tokens/<key>/train.npy --steps 50
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RefConfig:
    vocab_size: int = 8192
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_inner: int = 512
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: RefConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)  # default implementation


def get_batch(path: str, block_size: int, batch_size: int, offset: int = 0):
    """nanoGPT's get_batch: re-open the memmap each call (no leak), stack random windows."""
    data = np.memmap(path, dtype=np.uint16, mode="r", offset=offset)
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack(
        [torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix]
    )
    return x, y


def npy_data_offset(path: str) -> int:
    """Byte offset of the array in a .npy file (nanoGPT's .bin files have none)."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


@dataclass
class RefRecipe:
    """nanoGPT's recipe for a small model (its shakespeare_char 'baby GPT' settings)."""

    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    batch_size: int = 16
    log_interval: int = 10


def get_lr(it: int, r: RefRecipe, lr_decay_iters: int) -> float:
    if it < r.warmup_iters:
        return r.learning_rate * (it + 1) / (r.warmup_iters + 1)
    if it > lr_decay_iters:
        return r.min_lr
    ratio = (it - r.warmup_iters) / (lr_decay_iters - r.warmup_iters)
    return r.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r.learning_rate - r.min_lr)


def train(
    model: GPT,
    data_path: str,
    max_iters: int,
    recipe: RefRecipe | None = None,
    on_log=None,
    on_eval=None,
    eval_interval: int | None = None,
    seed: int = 1337,
) -> dict:
    """nanoGPT's loop. ``on_log(iter, loss, t)`` at log steps; ``on_eval(iter)`` every
    ``eval_interval`` iterations (its time is the caller's to subtract). Returns timings."""
    r = recipe or RefRecipe()
    torch.manual_seed(seed)
    offset = npy_data_offset(data_path) if data_path.endswith(".npy") else 0
    block = model.config.block_size
    optimizer = model.configure_optimizers(r.weight_decay, r.learning_rate, (r.beta1, r.beta2))
    model.train()
    X, Y = get_batch(data_path, block, r.batch_size, offset)
    t_start = time.perf_counter()
    eval_time = 0.0
    for it in range(max_iters):
        lr = get_lr(it, r, max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = model(X, Y)
        X, Y = get_batch(data_path, block, r.batch_size, offset)  # next batch, as nanoGPT does
        loss.backward()
        if r.grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_log is not None and (it + 1) % r.log_interval == 0:
            on_log(it + 1, loss.item(), time.perf_counter())
        if on_eval is not None and eval_interval and (it + 1) % eval_interval == 0:
            t0 = time.perf_counter()
            on_eval(it + 1)
            eval_time += time.perf_counter() - t0
    return {"wall": time.perf_counter() - t_start, "eval": eval_time}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", required=True, help="a uint16 .npy (or nanoGPT .bin) token file")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    torch.manual_seed(1337)
    model = GPT(RefConfig(vocab_size=args.vocab_size))
    stamps = []
    train(model, args.tokens, args.steps, on_log=lambda i, loss, t: stamps.append((i, loss, t)))
    for (i0, _, t0), (i1, loss, t1) in zip(stamps, stamps[1:], strict=False):
        tok_s = (i1 - i0) * RefRecipe().batch_size * model.config.block_size / (t1 - t0)
        print(f"iter {i1}: loss {loss:.4f}, {tok_s:,.0f} tokens/s")


if __name__ == "__main__":
    main()
