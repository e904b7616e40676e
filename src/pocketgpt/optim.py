"""The optimizer and its learning-rate schedule.

AdamW and SGD take every parameter (weight decay on matrices only). Muon (``torch.optim.Muon``)
orthogonalises the updates of the 2-D hidden matrices, the attention and feed-forward weights
inside the blocks; the embeddings, the head, norms and biases stay with AdamW, as in
modded-nanogpt. The two run as one ``MuonAdamW``, whose state dict checkpoints both.
"""

from __future__ import annotations

import math

import torch

from pocketgpt.config import OptimConfig
from pocketgpt.errors import ConfigError


class MuonAdamW:
    """Muon on the hidden matrices and AdamW on the rest, stepped together.

    ``param_groups`` lists both optimizers' groups, so gradient scaling treats it as one
    optimizer; the schedule sets each part's rate (``set_lr_factor``).
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        self.defaults = {"fused": adamw.defaults.get("fused")}

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ConfigError(
                "the checkpoint's optimizer state is not Muon + AdamW; resume it with the "
                "optimizer it was written with (optim=...)"
            )
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a block (attention, feed-forward): what Muon optimizes."""
    return p.dim() == 2 and ".blocks." in f".{name}"


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device: torch.device, sharded: bool = False
) -> torch.optim.Optimizer | MuonAdamW:
    """Weight decay on matrices (Linear weights, embeddings), none on biases and norms.

    ``sharded``: the parameters are FSDP2 shards, which the fused AdamW kernels do not take.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fused = device.type in ("cuda", "cpu") and not sharded
    betas = tuple(cfg.betas)
    if cfg.name == "muon":
        if sharded:
            raise ConfigError("optim=muon does not run on FSDP shards; use trainer.strategy=ddp")
        hidden = [p for n, p in named if is_hidden_matrix(n, p)]
        rest = [p for n, p in named if not is_hidden_matrix(n, p)]
        muon = torch.optim.Muon(
            hidden,
            lr=cfg.muon_lr,
            weight_decay=cfg.muon_weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=True,
        )
        groups = [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)
        return MuonAdamW(muon, adamw)
    params = [p for _, p in named]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ConfigError(f"optim.name={cfg.name!r} is not adamw, sgd or muon")


def describe_optimizer(optimizer: torch.optim.Optimizer | MuonAdamW) -> str:
    """e.g. ``AdamW fused``, for the trainer's log line."""
    if isinstance(optimizer, MuonAdamW):
        return "Muon + " + describe_optimizer(optimizer.adamw)
    name = type(optimizer).__name__
    return name + " fused" if optimizer.defaults.get("fused") else name


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The schedule's multiplier of the peak rate at ``step`` (0-based) of ``total_steps``.

    Every schedule warms up linearly over warmup_steps. Then cosine decays to min_lr_ratio at
    total_steps; constant stays at 1; wsd stays at 1 until the last cooldown_fraction of the
    steps, then falls linearly to min_lr_ratio at total_steps.

    >>> round(lr_factor(0, OptimConfig(warmup_steps=10), 100), 2)
    0.1
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        cooldown = round(cfg.cooldown_fraction * total_steps)
        left = total_steps - step  # steps still to take, this one included
        if left > cooldown:
            return 1.0
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (left - 1) / cooldown
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def set_lr_factor(
    optimizer: torch.optim.Optimizer | MuonAdamW, cfg: OptimConfig, factor: float
) -> None:
    """Every group's rate to its peak times ``factor``: optim.muon_lr for Muon's matrices,
    optim.lr for everything else."""
    if isinstance(optimizer, MuonAdamW):
        _scale(optimizer.muon, cfg.muon_lr * factor)
        _scale(optimizer.adamw, cfg.lr * factor)
    else:
        _scale(optimizer, cfg.lr * factor)


def _scale(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
