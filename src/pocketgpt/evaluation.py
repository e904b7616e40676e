"""Evaluation: mean next-token loss, perplexity and bits per byte over a split.

Its own room rather than part of the loop: the trainer evaluates the validation split with it,
the job evaluates the test split after training, and the benchmarks measure other models with
the same instrument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pocketgpt.data import TokenizedSplit, TokenWindows
from pocketgpt.distributed import Distributed, LossOf
from pocketgpt.errors import ConfigError
from pocketgpt.fused_loss import lm_loss
from pocketgpt.model import GPTMini
from pocketgpt.runtime import autocast_context

LN2 = math.log(2)


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bpb: float  # bits per UTF-8 byte: comparable across tokenizers
    tokens: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_loss": self.loss,
            f"{prefix}_ppl": self.perplexity,
            f"{prefix}_bpb": self.bpb,
        }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: TokenizedSplit,
    block_size: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    max_batches: int | None = None,
    dist: Distributed | None = None,
) -> EvalResult:
    """Mean next-token loss over the split's non-overlapping windows.

    Any model whose ``model(x, y)`` returns (logits, loss) works. Bits per byte = loss / ln 2 *
    tokens / bytes, using the split's own tokens-per-byte ratio. With ``dist`` (several
    processes) each rank evaluates every world_size-th batch and the sums are all-reduced, so
    every rank returns the figures one process would (up to the order of the additions).
    Under FSDP (``model`` the sharded ``LossOf``) every rank runs every batch instead: each
    forward gathers parameters from all ranks, so all must run the same forwards.
    """
    dist = dist or Distributed()
    was_training = model.training
    model.eval()
    windows = TokenWindows(split.tokens, block_size)
    total, count = 0.0, 0
    for i, (x, y) in enumerate(windows.sequential_batches(batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        if dist.active and not dist.sharded and i % dist.world_size != dist.rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast_context(device, precision):
            # lm_loss: the same mean loss without storing the (B, T, vocab) logits.
            if isinstance(model, LossOf):  # the training module: its forward is the loss
                loss = model(x, y)
            elif isinstance(model, GPTMini):
                loss = lm_loss(model, x, y)
            else:
                loss = model(x, y)[1]
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    if dist.active and not dist.sharded:
        total, count = dist.sum([total, count])
    count = int(count)
    if count == 0:
        raise ConfigError(
            f"the evaluation split has {len(split.tokens)} tokens, fewer than one window of "
            f"{block_size + 1}; use a larger split or a smaller data.block_size"
        )
    loss = total / count
    return EvalResult(loss, math.exp(min(loss, 50.0)), loss / LN2 / split.bytes_per_token, count)
