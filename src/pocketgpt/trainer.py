"""The training loop: optimizer, schedule, mixed precision, evaluation and early stopping."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pocketgpt.checkpoint import (
    checkpoint_name,
    prune,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_meta,
)
from pocketgpt.config import ConfigError, OptimConfig, TrainerConfig
from pocketgpt.data import TokenizedSplit, TokenWindows
from pocketgpt.errors import NonFiniteLossError
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


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on a CUDA GPU that supports it, else fp16 on CUDA; fp32 elsewhere.

    On CPUs autocast to bf16 was measured far slower than fp32 (no native bf16 matmuls on this
    AVX2 machine; see BENCHMARKS.md), and MPS autocast is not mature enough to be a default.
    """
    precision = str(precision).lower()
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_context(device: torch.device, precision: str):
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def should_compile(setting: str, device: torch.device) -> bool:
    """auto: compile on CUDA only; on the CPU it measured no faster than the eager fused loss
    and costs 30-40 s of compiling (BENCHMARKS.md, section (a))."""
    setting = str(setting).lower()
    if setting == "auto":
        return device.type == "cuda"
    return setting == "true"


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> str:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every step.

    glibc serves blocks above its mmap threshold (at most 32 MB, so always the 64 MB logits at
    GPTMini's default shape) with fresh pages from the kernel and unmaps them on free, so every
    step pays page faults on first touch of each large tensor; raising the mmap and trim
    thresholds lets a step reuse the previous step's pages. Process-wide, idempotent, glibc
    only; returns what it did, for the log.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return "glibc malloc keeps freed pages"
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default malloc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        return "default malloc"
    _ALLOCATOR_TUNED = bool(ok)
    return "glibc malloc keeps freed pages" if ok else "default malloc"


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
            # GPTMini.loss: the same mean loss without storing the (B, T, vocab) logits.
            loss = model.loss(x, y) if isinstance(model, GPTMini) else model(x, y)[1]
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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint of the last complete step."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.checkpoint = checkpoint


class _GracefulStop:
    """Turns the first SIGINT/SIGTERM into a request honoured between steps.

    A second signal interrupts at once. Only the main thread can install handlers; elsewhere
    (e.g. a parallel sweep's worker thread) signals keep their default behaviour.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LoopState:
    """Everything the loop carries from step to step, saved in each checkpoint."""

    step: int = 0
    best_val_loss: float = math.inf
    bad_evals: int = 0
    window_loss: float = 0.0  # train loss summed since the last log line
    window_steps: int = 0
    skipped_steps: int = 0
    last_eval: dict | None = None  # EvalResult fields of the latest evaluation

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    train_time: float
    final_val: EvalResult
    best_val_loss: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    last_checkpoint: Path | None = None
    # Seconds of fit() spent in each part: data (batches), compute (forward, backward, optimizer),
    # tracking (log_metrics), progress (the bar), eval, checkpoint, and total (all of fit).
    timings: dict[str, float] = field(default_factory=dict)


TIMING_KEYS = ("data", "compute", "tracking", "progress", "eval", "checkpoint", "total")


class Trainer:
    """Runs the optimization loop and reports metrics through ``log_metrics(metrics, step)``.

    With a ``checkpoint_dir`` it writes a checkpoint every ``trainer.checkpoint_interval`` steps,
    at the end, and when interrupted (Ctrl-C); ``resume`` (a loaded checkpoint) continues a run
    exactly where that checkpoint left it.
    """

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
        checkpoint_dir: Path | None = None,
        checkpoint_meta: dict | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
        resume: dict | None = None,
    ):
        self.raw_model = model
        self.cfg = cfg
        self.optim_cfg = optim_cfg
        self.device = device
        self.block_size = block_size
        self.train_windows = TokenWindows(train.tokens, block_size, stride)
        self.validation = validation
        self.log_metrics = log_metrics
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_meta = checkpoint_meta or {}
        self.on_checkpoint = on_checkpoint
        self.batches_per_epoch = len(self.train_windows) // cfg.batch_size
        if self.batches_per_epoch < cfg.grad_accum:
            raise ConfigError(
                f"the train split gives {len(self.train_windows)} windows of {block_size + 1} "
                f"tokens, fewer than one step of trainer.batch_size={cfg.batch_size} x "
                f"trainer.grad_accum={cfg.grad_accum}; lower them or use more data"
            )
        self.steps_per_epoch = self.batches_per_epoch // cfg.grad_accum
        self.total_steps = min(cfg.max_steps, cfg.epochs * self.steps_per_epoch)
        self.precision = resolve_precision(cfg.precision, device)
        self.compiled = should_compile(cfg.compile, device)
        self.allocator = tune_cpu_allocator() if device.type == "cpu" else "default"
        self.model = torch.compile(model) if self.compiled else model
        # Training reads only the loss: GPTMini.loss skips storing the (B, T, vocab) logits.
        # A compiled model goes through forward, which torch.compile fuses itself.
        self._loss = (
            model.loss
            if not self.compiled and hasattr(model, "loss")
            else (lambda x, y: self.model(x, y)[1])
        )
        self.optimizer = build_optimizer(model, optim_cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.timings: dict[str, float] = dict.fromkeys(TIMING_KEYS, 0.0)
        self.state = LoopState()
        self.last_checkpoint: Path | None = None
        if resume is not None:
            self._restore(resume)

    def describe(self) -> str:
        """One line: what the trainer chose for this device, and why (printed by fit)."""
        cfg, dev = self.cfg, self.device
        precision = self.precision + (
            f" (auto on {dev.type})" if str(cfg.precision).lower() == "auto" else ""
        )
        compiled = ("on" if self.compiled else "off") + (
            f" (auto on {dev.type})" if str(cfg.compile).lower() == "auto" else ""
        )
        threads = f"{torch.get_num_threads()}" + ("" if cfg.threads else " (torch default)")
        opt = type(self.optimizer).__name__
        if self.optimizer.defaults.get("fused"):
            opt += " fused"
        fused_head = dev.type == "cpu" and self.precision == "fp32" and not self.compiled
        return (
            f"trainer: device {dev}, precision {precision}, compile {compiled}, threads "
            f"{threads}, {opt}, "
            + ("fused chunked head+loss, " if fused_head else "")
            + self.allocator
        )

    # ----------------------------------------------------------------- checkpoints

    def _restore(self, ckpt: dict) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = LoopState(**ckpt["loop"])
        set_rng_state(ckpt["rng"])

    def save_checkpoint(self, finished: bool = False) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        t0 = time.perf_counter()
        try:
            return self._save_checkpoint(finished)
        finally:
            self.timings["checkpoint"] += time.perf_counter() - t0

    def _save_checkpoint(self, finished: bool) -> Path:
        step = self.state.step
        epoch, batch = divmod(step * self.cfg.grad_accum, self.batches_per_epoch)
        payload = {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng_state(),
            "loop": self.state.to_dict(),
            # The data position follows from the step; stored too, for people reading it.
            "data": {"epoch": epoch, "batch_in_epoch": batch},
            "meta": {**self.checkpoint_meta, "step": step, "finished": finished},
        }
        # meta.json (what resume=auto matches on) is written before the first checkpoint can
        # appear, so a kill right after any checkpoint still finds it; "finished" only after
        # the final one is safely on disk.
        meta = {**self.checkpoint_meta, "step": step, "finished": False}
        write_meta(self.checkpoint_dir, meta)
        path = save_checkpoint(self.checkpoint_dir / checkpoint_name(step), payload)
        if finished:
            write_meta(self.checkpoint_dir, {**meta, "finished": True})
        prune(self.checkpoint_dir, self.cfg.keep_checkpoints)
        self.last_checkpoint = path
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)
        return path

    # ----------------------------------------------------------------- the loop

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
            self.precision,
            self.cfg.eval_max_batches,
        )

    def _train_step(self, batches) -> tuple[float, torch.Tensor] | None:
        """One optimizer step over grad_accum micro-batches -> (mean loss, grad norm).

        Returns None when the loss was not finite and trainer.on_nonfinite=skip.
        """
        cfg, model, opt, timings = self.cfg, self.model, self.optimizer, self.timings
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            _, x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            t1 = time.perf_counter()
            timings["data"] += t1 - t0
            with autocast_context(self.device, self.precision):
                loss = self._loss(x, y)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            # On the CPU .item() costs nothing (no device queue to drain) and the finite check
            # below must precede the optimizer step.
            step_loss += loss.item() / cfg.grad_accum
            timings["compute"] += time.perf_counter() - t1
        if not math.isfinite(step_loss):
            opt.zero_grad(set_to_none=True)
            if cfg.on_nonfinite == "skip":
                return None
            where = (
                f"; the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint
                else ""
            )
            raise NonFiniteLossError(
                f"the training loss became {step_loss} at step {self.state.step + 1}{where}; "
                f"lower optim.lr, set trainer.grad_clip, or trainer.on_nonfinite=skip"
            )
        t0 = time.perf_counter()
        self.scaler.unscale_(opt)
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        timings["compute"] += time.perf_counter() - t0
        return step_loss, grad_norm  # the norm stays a tensor until a log step reads it

    def fit(self) -> TrainResult:
        cfg, st, timings = self.cfg, self.state, self.timings
        clock = time.perf_counter
        print(self.describe(), flush=True)
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.block_size
        batches = self._batches(st.step)
        stopped_early = False
        history: list[dict] = []
        start = window_start = clock()
        eval_time = 0.0
        bar = tqdm(
            total=self.total_steps,
            initial=st.step,
            disable=not cfg.progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )

        def log(metrics: dict[str, float], step: int) -> None:
            t0 = clock()
            self.log_metrics(metrics, step)
            timings["tracking"] += clock() - t0

        def write(line: str) -> None:
            t0 = clock()
            bar.write(line)
            timings["progress"] += clock() - t0

        def run_evaluation() -> EvalResult:
            nonlocal eval_time, window_start
            t0 = clock()
            result = self._evaluate()
            spent = clock() - t0
            eval_time += spent
            timings["eval"] += spent
            window_start += spent  # keep evaluation out of tokens/s
            st.last_eval = vars(result)
            log(result.as_metrics("val"), st.step)
            write(
                f"step {st.step}: val loss {result.loss:.4f}, "
                f"ppl {result.perplexity:.1f}, bpb {result.bpb:.4f}"
            )
            return result

        with _GracefulStop() as stop, contextlib.closing(bar):
            if cfg.eval_at_start and st.step == 0 and self.total_steps > 0:
                # The untrained model's figures: the baseline every later evaluation is read
                # against (about ln(vocab) nats a token), as nanoGPT logs at iteration 0.
                st.best_val_loss = run_evaluation().loss
            while st.step < self.total_steps:
                lr = self.optim_cfg.lr * lr_factor(st.step, self.optim_cfg, self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                out = self._train_step(batches)
                st.step += 1
                t0 = clock()
                bar.update(1)
                timings["progress"] += clock() - t0
                if out is None:
                    st.skipped_steps += 1
                    write(f"step {st.step}: non-finite loss, step skipped")
                    log({"skipped_steps": st.skipped_steps}, st.step)
                    continue
                loss, grad_norm = out
                st.window_loss += loss
                st.window_steps += 1
                if st.step % cfg.log_interval == 0 or st.step == self.total_steps:
                    # The window runs from log step to log step: logging, the bar and
                    # checkpoints count in tokens/s, evaluation does not.
                    now = clock()
                    elapsed, window_start = now - window_start, now
                    metrics = {
                        "train_loss": st.window_loss / st.window_steps,
                        "lr": lr,
                        "tokens_per_sec": st.window_steps * tokens_per_step / max(elapsed, 1e-9),
                        "grad_norm": float(grad_norm),
                    }
                    log(metrics, st.step)
                    t0 = clock()
                    bar.set_postfix(
                        loss=f"{metrics['train_loss']:.3f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{metrics['tokens_per_sec']:.0f}",
                    )
                    timings["progress"] += clock() - t0
                    history.append({"step": st.step, **metrics})
                    st.window_loss, st.window_steps = 0.0, 0
                out_of_time = (
                    cfg.max_time is not None and clock() - start - eval_time >= cfg.max_time
                )
                if st.step % cfg.eval_interval == 0 or st.step == self.total_steps or out_of_time:
                    result = run_evaluation()
                    if result.loss < st.best_val_loss - 1e-6:
                        st.best_val_loss, st.bad_evals = result.loss, 0
                    else:
                        st.bad_evals += 1
                        if cfg.patience is not None and st.bad_evals >= cfg.patience:
                            write(f"early stop: no improvement in {st.bad_evals} evaluations")
                            stopped_early = True
                            break
                if out_of_time:
                    write(f"trainer.max_time={cfg.max_time}s reached at step {st.step}")
                    break
                if cfg.checkpoint_interval and st.step % cfg.checkpoint_interval == 0:
                    self.save_checkpoint()
                if stop.signum is not None:
                    write(f"{signal.Signals(stop.signum).name}: stopping after step {st.step}")
                    raise TrainingInterrupted(stop.signum, self.save_checkpoint())
        if st.last_eval is None:  # only when no step ran at all
            t0 = clock()
            st.last_eval = vars(self._evaluate())
            timings["eval"] += clock() - t0
        self.save_checkpoint(finished=True)
        final = EvalResult(**st.last_eval)
        timings["total"] = clock() - start
        return TrainResult(
            steps=st.step,
            tokens_seen=st.step * tokens_per_step,
            train_time=timings["total"],
            final_val=final,
            best_val_loss=min(st.best_val_loss, final.loss),
            stopped_early=stopped_early,
            history=history,
            last_checkpoint=self.last_checkpoint,
            timings=dict(timings),
        )
