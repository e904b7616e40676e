"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from pocketgpt.config import OptimConfig
from pocketgpt.errors import ConfigError


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device: torch.device, sharded: bool = False
) -> torch.optim.Optimizer:
    """Weight decay on matrices (Linear weights, embeddings), none on biases and LayerNorms.

    ``sharded``: the parameters are FSDP2 shards, which the fused AdamW kernels do not take.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            fused=device.type in ("cuda", "cpu") and not sharded,
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ConfigError(f"optim.name={cfg.name!r} is not adamw or sgd")


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """e.g. ``AdamW fused``, for the trainer's log line."""
    name = type(optimizer).__name__
    return name + " fused" if optimizer.defaults.get("fused") else name


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at total_steps.

    >>> round(lr_factor(0, OptimConfig(warmup_steps=10), 100), 2)
    0.1
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
