"""The training loop: steps, the logging and evaluation cadence, early stopping, checkpoints,
Ctrl-C and SIGTERM, and where the time goes.

The rooms it draws on: ``runtime`` (device, precision, compile), ``optim`` (optimizer and
schedule), ``evaluation`` (validation figures), ``checkpoint`` (writing them). What the loop
reports goes through ``TrainerHooks``, given at construction.
"""

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

from pocketgpt.checkpoint import CheckpointWriter, rng_state, set_rng_state
from pocketgpt.config import OptimConfig, TrainerConfig
from pocketgpt.data import TokenizedSplit, TokenWindows
from pocketgpt.errors import ConfigError, NonFiniteLossError
from pocketgpt.evaluation import EvalResult, evaluate
from pocketgpt.fused_loss import lm_loss
from pocketgpt.model import GPTMini
from pocketgpt.optim import build_optimizer, describe_optimizer, lr_factor, set_lr
from pocketgpt.runtime import Runtime


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


def _ignore_metrics(metrics: dict[str, float], step: int) -> None:
    return None


@dataclass
class TrainerHooks:
    """Where the loop reports; called only inside ``fit``."""

    log_metrics: Callable[[dict[str, float], int], None] = _ignore_metrics
    on_checkpoint: Callable[[Path], None] | None = None  # after each checkpoint is on disk


@dataclass(frozen=True)
class TrainData:
    """What the loop trains and validates on."""

    train: TokenizedSplit
    validation: TokenizedSplit
    block_size: int  # tokens of context per window
    stride: int | None = None  # distance between training windows' starts; None = block_size


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
    # Each validation pass of fit(): its step, train_seconds (fit's time before it, evaluations
    # left out) and the EvalResult fields: a validation curve against training time.
    evals: list[dict] = field(default_factory=list)


TIMING_KEYS = ("data", "compute", "tracking", "progress", "eval", "checkpoint", "total")


class Trainer:
    """Runs the optimization loop on ``data`` and reports through ``hooks``.

    With ``checkpoints`` it writes a checkpoint every ``trainer.checkpoint_interval`` steps, at
    the end, and when interrupted (Ctrl-C); ``resume`` (a loaded checkpoint) continues a run
    exactly where that checkpoint left it.
    """

    def __init__(
        self,
        model: GPTMini,
        data: TrainData,
        cfg: TrainerConfig,
        optim_cfg: OptimConfig,
        runtime: Runtime,
        hooks: TrainerHooks | None = None,
        checkpoints: CheckpointWriter | None = None,
        resume: dict | None = None,
    ):
        self.raw_model = model
        self.cfg = cfg
        self.optim_cfg = optim_cfg
        self.runtime = runtime
        self.device = runtime.device
        self.block_size = data.block_size
        self.train_windows = TokenWindows(data.train.tokens, data.block_size, data.stride)
        self.validation = data.validation
        self.hooks = hooks or TrainerHooks()
        self.checkpoints = checkpoints
        self.batches_per_epoch = len(self.train_windows) // cfg.batch_size
        if self.batches_per_epoch < cfg.grad_accum:
            raise ConfigError(
                f"the train split gives {len(self.train_windows)} windows of "
                f"{data.block_size + 1} tokens, fewer than one step of trainer.batch_size="
                f"{cfg.batch_size} x trainer.grad_accum={cfg.grad_accum}; lower them or use "
                f"more data"
            )
        self.steps_per_epoch = self.batches_per_epoch // cfg.grad_accum
        self.total_steps = min(cfg.max_steps, cfg.epochs * self.steps_per_epoch)
        self.model = torch.compile(model) if runtime.compiled else model
        # Training reads only the loss: lm_loss skips storing the (B, T, vocab) logits.
        # A compiled model goes through forward, which torch.compile fuses itself.
        self._lm_loss = not runtime.compiled and isinstance(model, GPTMini)
        self.optimizer = build_optimizer(model, optim_cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=runtime.precision == "fp16")
        self.timings: dict[str, float] = dict.fromkeys(TIMING_KEYS, 0.0)
        self.state = LoopState()
        self.last_checkpoint: Path | None = None
        if resume is not None:
            self._restore(resume)

    def describe(self) -> str:
        """One line: what the trainer chose for this device, and why (printed by fit)."""
        return self.runtime.describe(describe_optimizer(self.optimizer))

    # ----------------------------------------------------------------- checkpoints

    def _restore(self, ckpt: dict) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = LoopState(**ckpt["loop"])
        set_rng_state(ckpt["rng"])

    def save_checkpoint(self, finished: bool = False) -> Path | None:
        """Checkpoint the last complete step (None without a checkpoint folder)."""
        if self.checkpoints is None:
            return None
        t0 = time.perf_counter()
        try:
            step = self.state.step
            epoch, batch = divmod(step * self.cfg.grad_accum, self.batches_per_epoch)
            state = {
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "rng": rng_state(),
                "loop": self.state.to_dict(),
                # The data position follows from the step; stored too, for people reading it.
                "data": {"epoch": epoch, "batch_in_epoch": batch},
            }
            path = self.checkpoints.write(step, state, finished)
            self.last_checkpoint = path
            if self.hooks.on_checkpoint is not None:
                self.hooks.on_checkpoint(path)
            return path
        finally:
            self.timings["checkpoint"] += time.perf_counter() - t0

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
            self.runtime.precision,
            self.cfg.eval_max_batches,
        )

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._lm_loss:
            return lm_loss(self.raw_model, x, y)
        return self.model(x, y)[1]

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
            with self.runtime.autocast():
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
        evals: list[dict] = []
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
            self.hooks.log_metrics(metrics, step)
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
            evals.append({"step": st.step, "train_seconds": t0 - start - eval_time, **vars(result)})
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
                set_lr(self.optimizer, lr)
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
            evals=evals,
        )
