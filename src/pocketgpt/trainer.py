"""The training loop: optimizer, schedule, mixed precision, evaluation and early stopping."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pocketgpt.config import ConfigError, OptimConfig, TrainerConfig
from pocketgpt.data import TokenizedSplit, TokenWindows
from pocketgpt.model import GPTMini

LN2 = math.log(2)


# --------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, else mps, else cpu; a requested device that is missing is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda but no CUDA device is available; use trainer.device=cpu"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device=mps but MPS is not available; use trainer.device=cpu")
    return torch.device(name)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def should_compile(setting: str, device: torch.device) -> bool:
    """auto: compile on CUDA only; on CPU it was measured slower (see BENCHMARKS.md)."""
    setting = str(setting).lower()
    if setting == "auto":
        return device.type == "cuda"
    return setting == "true"


# --------------------------------------------------------------------------- optimizer


def build_optimizer(
    model: GPTMini, cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """Weight decay on matrices (Linear weights, embeddings), none on biases and LayerNorms."""
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
            fused=device.type in ("cuda", "cpu"),
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ConfigError(f"optim.name={cfg.name!r} is not adamw or sgd")


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


# --------------------------------------------------------------------------- evaluation


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
) -> EvalResult:
    """Mean next-token loss over the split's non-overlapping windows.

    Bits per byte = loss / ln 2 * tokens / bytes, using the split's own tokens-per-byte ratio.
    """
    was_training = model.training
    model.eval()
    windows = TokenWindows(split.tokens, block_size)
    total, count = 0.0, 0
    for i, (x, y) in enumerate(windows.sequential_batches(batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        with autocast_context(device, precision):
            _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ConfigError(
            f"the evaluation split has {len(split.tokens)} tokens, fewer than one window of "
            f"{block_size + 1}; use a larger split or a smaller data.block_size"
        )
    loss = total / count
    return EvalResult(loss, math.exp(min(loss, 50.0)), loss / LN2 / split.bytes_per_token, count)


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    train_time: float
    final_val: EvalResult
    best_val_loss: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Runs the optimization loop and reports metrics through ``log_metrics(metrics, step)``."""

    def __init__(
        self,
        model: GPTMini,
        train: TokenizedSplit,
        validation: TokenizedSplit,
        optim_cfg: OptimConfig,
        cfg: TrainerConfig,
        block_size: int,
        stride: int | None,
        device: torch.device,
        log_metrics: Callable[[dict[str, float], int], None] = lambda m, s: None,
    ):
        self.raw_model = model
        self.cfg = cfg
        self.optim_cfg = optim_cfg
        self.device = device
        self.block_size = block_size
        self.train_windows = TokenWindows(train.tokens, block_size, stride)
        self.validation = validation
        self.log_metrics = log_metrics
        self.batches_per_epoch = len(self.train_windows) // cfg.batch_size
        if self.batches_per_epoch < cfg.grad_accum:
            raise ConfigError(
                f"the train split gives {len(self.train_windows)} windows of {block_size + 1} "
                f"tokens, fewer than one step of trainer.batch_size={cfg.batch_size} x "
                f"trainer.grad_accum={cfg.grad_accum}; lower them or use more data"
            )
        self.steps_per_epoch = self.batches_per_epoch // cfg.grad_accum
        self.total_steps = min(cfg.max_steps, cfg.epochs * self.steps_per_epoch)
        self.model = torch.compile(model) if should_compile(cfg.compile, device) else model
        self.optimizer = build_optimizer(model, optim_cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def _batches(self, start_step: int = 0):
        """Endless (epoch, x, y) over shuffled epochs, starting where ``start_step`` left off.

        The position in the data is a function of the step alone, so a resumed run sees exactly
        the batches an uninterrupted one would have.
        """
        first = start_step * self.cfg.grad_accum
        epoch, offset = divmod(first, self.batches_per_epoch)
        while True:
            for x, y in self.train_windows.epoch_batches(
                self.cfg.batch_size, epoch, self.cfg.seed, start_batch=offset
            ):
                yield epoch, x, y
            epoch, offset = epoch + 1, 0

    def _evaluate(self) -> EvalResult:
        return evaluate(
            self.model,
            self.validation,
            self.block_size,
            self.cfg.batch_size,
            self.device,
            self.cfg.precision,
            self.cfg.eval_max_batches,
        )

    def _train_step(self, batches) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches -> (mean loss, grad norm)."""
        cfg, model, opt = self.cfg, self.model, self.optimizer
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            _, x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast_context(self.device, cfg.precision):
                _, loss = model(x, y)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
        self.scaler.unscale_(opt)
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        return step_loss, float(grad_norm)

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.block_size
        batches = self._batches()
        best, bad_evals, stopped_early = math.inf, 0, False
        history: list[dict] = []
        step = 0
        window_loss, window_steps = 0.0, 0
        start = window_start = time.perf_counter()
        eval_time = 0.0
        last_eval: EvalResult | None = None
        bar = tqdm(
            total=self.total_steps,
            disable=not cfg.progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        try:
            while step < self.total_steps:
                lr = self.optim_cfg.lr * lr_factor(step, self.optim_cfg, self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, grad_norm = self._train_step(batches)
                step += 1
                window_loss += loss
                window_steps += 1
                bar.update(1)
                if step % cfg.log_interval == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    metrics = {
                        "train_loss": window_loss / window_steps,
                        "lr": lr,
                        "tokens_per_sec": window_steps * tokens_per_step / max(elapsed, 1e-9),
                        "grad_norm": grad_norm,
                    }
                    self.log_metrics(metrics, step)
                    bar.set_postfix(
                        loss=f"{metrics['train_loss']:.3f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{metrics['tokens_per_sec']:.0f}",
                    )
                    history.append({"step": step, **metrics})
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                out_of_time = (
                    cfg.max_time is not None
                    and time.perf_counter() - start - eval_time >= cfg.max_time
                )
                if step % cfg.eval_interval == 0 or step == self.total_steps or out_of_time:
                    t0 = time.perf_counter()
                    last_eval = self._evaluate()
                    spent = time.perf_counter() - t0
                    eval_time += spent
                    window_start += spent  # keep evaluation out of tokens/s
                    self.log_metrics(last_eval.as_metrics("val"), step)
                    bar.write(
                        f"step {step}: val loss {last_eval.loss:.4f}, "
                        f"ppl {last_eval.perplexity:.1f}, bpb {last_eval.bpb:.4f}"
                    )
                    if last_eval.loss < best - 1e-6:
                        best, bad_evals = last_eval.loss, 0
                    else:
                        bad_evals += 1
                        if cfg.patience is not None and bad_evals >= cfg.patience:
                            bar.write(f"early stop: no improvement in {bad_evals} evaluations")
                            stopped_early = True
                            break
                if out_of_time:
                    bar.write(f"trainer.max_time={cfg.max_time}s reached at step {step}")
                    break
        finally:
            bar.close()
        if last_eval is None:  # only when no step ran at all
            last_eval = self._evaluate()
        return TrainResult(
            steps=step,
            tokens_seen=step * tokens_per_step,
            train_time=time.perf_counter() - start,
            final_val=last_eval,
            best_val_loss=min(best, last_eval.loss),
            stopped_early=stopped_early,
            history=history,
        )
