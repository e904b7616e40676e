"""The training loop: steps, the logging and evaluation cadence, early stopping, checkpoints,
Ctrl-C and SIGTERM, and where the time goes.

The rooms it draws on: ``runtime`` (device, precision, compile), ``optim`` (optimizer and
schedule), ``evaluation`` (validation figures), ``checkpoint`` (writing them). What the loop
reports goes through ``TrainerHooks``, given at construction; what it shows (a bar, log lines
through the ``pocketgpt.trainer`` logger) goes through ``progress``.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pocketgpt.checkpoint import CheckpointWriter, rng_state, set_rng_state
from pocketgpt.config import OptimConfig, TrainerConfig
from pocketgpt.data import TokenizedSplit, TokenWindows
from pocketgpt.distributed import (
    LossOf,
    full_state_dicts,
    gradient_sync,
    load_full_state_dicts,
    wrap,
)
from pocketgpt.errors import ConfigError, NonFiniteLossError
from pocketgpt.evaluation import EvalResult, evaluate
from pocketgpt.fused_loss import lm_loss
from pocketgpt.model import GPTMini
from pocketgpt.optim import build_optimizer, describe_optimizer, lr_factor, set_lr_factor
from pocketgpt.progress import TrainingProgress, say
from pocketgpt.progress import log as progress_log
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


def _forward_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y)[1]


@dataclass
class TrainerHooks:
    """Where the loop reports; called only inside ``fit``."""

    log_metrics: Callable[[dict[str, float], int], None] = _ignore_metrics
    on_checkpoint: Callable[[Path], None] | None = None  # after each checkpoint is on disk
    # Before each checkpoint: the figures logged so far are stored (a resumed job lacks none).
    before_checkpoint: Callable[[], None] | None = None


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
    # tracking (log_metrics), progress (the bar and the log lines), eval, checkpoint, and total.
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
        self.dist = runtime.dist
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(
                f"trainer.batch_size={cfg.batch_size} (the global batch) does not divide among "
                f"{self.dist.world_size} processes; use a multiple of {self.dist.world_size}"
            )
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
        use_lm_loss = not runtime.compiled and isinstance(model, GPTMini)
        loss_fn = lm_loss if use_lm_loss else _forward_loss
        # Several processes: each rank's loss goes through DDP or FSDP (pocketgpt.distributed).
        self.step_module = wrap(LossOf(self.model, loss_fn), self.dist, self.device)
        self.optimizer = build_optimizer(
            self.step_module, optim_cfg, self.device, sharded=self.dist.sharded
        )
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
        load_full_state_dicts(
            self.step_module,
            self.raw_model,
            self.optimizer,
            ckpt["model"],
            ckpt["optimizer"],
            self.dist,
        )
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
            # Every rank takes part (FSDP gathers its shards); rank 0 alone writes.
            model_sd, optim_sd = full_state_dicts(
                self.step_module, self.raw_model, self.optimizer, self.dist
            )
            if not self.dist.is_main:
                self.dist.barrier()  # until rank 0's file is complete
                self.last_checkpoint = self.dist.broadcast(None)
                return self.last_checkpoint
            state = {
                "model": model_sd,
                "optimizer": optim_sd,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "rng": rng_state(),
                "loop": self.state.to_dict(),
                # The data position follows from the step; stored too, for people reading it.
                "data": {"epoch": epoch, "batch_in_epoch": batch},
            }
            if self.hooks.before_checkpoint is not None:
                self.hooks.before_checkpoint()
            path = self.checkpoints.write(step, state, finished)
            self.dist.barrier()
            self.last_checkpoint = path = self.dist.broadcast(path)
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
            self.eval_model,
            self.validation,
            self.block_size,
            self.cfg.batch_size,
            self.device,
            self.runtime.precision,
            self.cfg.eval_max_batches,
            dist=self.dist,
        )

    @property
    def eval_model(self) -> torch.nn.Module:
        """What evaluation runs: the model itself, or under FSDP the sharded training module
        (its forward gathers the parameters)."""
        return self.step_module if self.dist.sharded else self.model

    def final_model(self) -> GPTMini | None:
        """The trained model as one process holds it, for sampling and logging: the model
        itself, or under FSDP a copy from the gathered shards (a collective; rank 0 gets the
        copy, other ranks None)."""
        if not self.dist.sharded:
            return self.raw_model
        state, _ = full_state_dicts(self.step_module, self.raw_model, self.optimizer, self.dist)
        if not self.dist.is_main:
            return None
        model = GPTMini(self.raw_model.config)
        model.load_state_dict(state)
        return model.to(self.device)

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (all of them in one process)."""
        if not self.dist.active:
            return t
        per_rank = t.size(0) // self.dist.world_size
        return t[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]

    def _train_step(self, batches) -> tuple[float, torch.Tensor] | None:
        """One optimizer step over grad_accum micro-batches -> (mean loss, grad norm).

        Returns None when the loss was not finite and trainer.on_nonfinite=skip.
        """
        cfg, opt, timings = self.cfg, self.optimizer, self.timings
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            _, x, y = next(batches)
            x, y = self._shard(x), self._shard(y)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            t1 = time.perf_counter()
            timings["data"] += t1 - t0
            # Several processes: gradients are averaged once, in the last micro-batch.
            with gradient_sync(self.step_module, sync=micro == cfg.grad_accum - 1):
                with self.runtime.autocast():
                    loss = self.step_module(x, y)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            # On the CPU .item() costs nothing (no device queue to drain) and the finite check
            # below must precede the optimizer step.
            step_loss += loss.item() / cfg.grad_accum
            timings["compute"] += time.perf_counter() - t1
        if self.dist.active:  # the global batch's mean loss, the same on every rank
            step_loss = self.dist.sum([step_loss])[0] / self.dist.world_size
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
        params = [p for p in self.step_module.parameters() if p.grad is not None]
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
        if self.dist.is_main:
            say(progress_log, self.describe())
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.block_size
        batches = self._batches(st.step)
        stopped_early = False
        history: list[dict] = []
        evals: list[dict] = []
        start = window_start = clock()
        eval_time = 0.0
        # Rank 0 alone reports: every rank's figures are the same (all-reduced).
        progress = TrainingProgress(
            self.total_steps, st.step, cfg.progress, shown=self.dist.is_main
        )

        def log(metrics: dict[str, float], step: int) -> None:
            t0 = clock()
            self.hooks.log_metrics(metrics, step)
            timings["tracking"] += clock() - t0

        def write(line: str, level: int = logging.INFO) -> None:
            t0 = clock()
            progress.line(line, level)
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

        with _GracefulStop() as stop, progress:
            if cfg.eval_at_start and st.step == 0 and self.total_steps > 0:
                # The untrained model's figures: the baseline every later evaluation is read
                # against (about ln(vocab) nats a token), as nanoGPT logs at iteration 0.
                st.best_val_loss = run_evaluation().loss
            while st.step < self.total_steps:
                factor = lr_factor(st.step, self.optim_cfg, self.total_steps)
                set_lr_factor(self.optimizer, self.optim_cfg, factor)
                lr = self.optim_cfg.lr * factor  # logged: AdamW's (with Muon: the non-matrices')
                out = self._train_step(batches)
                st.step += 1
                t0 = clock()
                progress.advance()
                timings["progress"] += clock() - t0
                if out is None:
                    st.skipped_steps += 1
                    write(f"step {st.step}: non-finite loss, step skipped", logging.WARNING)
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
                    progress.step(st.step, self.total_steps, metrics)
                    timings["progress"] += clock() - t0
                    history.append({"step": st.step, **metrics})
                    st.window_loss, st.window_steps = 0.0, 0
                out_of_time = (
                    cfg.max_time is not None and clock() - start - eval_time >= cfg.max_time
                )
                stopping = stop.signum is not None
                if self.dist.active:
                    # Clocks and signals differ between ranks, and every rank must take the
                    # same branch (each holds collectives): a flag set on any rank counts.
                    flags = self.dist.sum([float(out_of_time), float(stopping)])
                    out_of_time, stopping = flags[0] > 0, flags[1] > 0
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
                if stopping:
                    signum = stop.signum or signal.SIGTERM  # another rank's signal
                    write(f"{signal.Signals(signum).name}: stopping after step {st.step}")
                    raise TrainingInterrupted(signum, self.save_checkpoint())
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
