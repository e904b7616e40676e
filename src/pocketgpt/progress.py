"""How the training loop shows its progress: a tqdm bar on a terminal, plain log lines elsewhere.

Every step and evaluation line goes through the ``pocketgpt.trainer`` logger, so a Hydra job's
log file (``<output_dir>/train.log``) holds the whole run. What the console shows depends on
where stderr goes (``trainer.progress=auto``):

- a terminal (or a notebook): the bar, with evaluations and notices printed above it; the step
  lines go to the log file only, since the bar shows the same figures;
- anything else (a file, CI, nohup): no bar, so no carriage returns in logs; one plain line per
  log step instead.

A job of a sweep has a ``JobSlot`` (set by ``pocketgpt.tracking.sweep``): its bar gets its own
terminal line, and its console lines carry its number and leave out the step lines, so parallel
jobs sharing one terminal stay readable.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TextIO

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as chosen_tqdm
from tqdm.std import tqdm as terminal_tqdm

from pocketgpt.config import Progress

log = logging.getLogger("pocketgpt.trainer")

# Set on the records of step lines (log.info(..., extra={STEP_LINE: True})): what a console
# under a bar, or a sweep job's console, leaves out.
STEP_LINE = "pocketgpt_step_line"


@dataclass(frozen=True)
class JobSlot:
    """Which job of a sweep this process runs."""

    label: str  # "#3": the prefix of its console lines and the name of its bar
    position: int  # its bar's terminal line: the job number modulo the jobs run at once


# A sweep job's identity is process-wide (Hydra's is too): a launcher runs one job at a time
# in a process, and the sweep callback sets this at the job's start and clears it at its end.
_slot: JobSlot | None = None


def set_job_slot(slot: JobSlot | None) -> None:
    global _slot
    _slot = slot


def job_slot() -> JobSlot | None:
    return _slot


def wants_bar(mode: Progress, stream: TextIO | None = None) -> bool:
    """Whether ``mode`` draws a bar on ``stream`` (stderr by default)."""
    if mode is Progress.true:
        return True
    if mode is Progress.false:
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    # tqdm picks its notebook bar inside Jupyter, where stderr is no terminal but shows bars.
    return bool(isatty and isatty()) or chosen_tqdm is not terminal_tqdm


def console_handlers(logger: logging.Logger | None = None) -> list[logging.StreamHandler]:
    """The handlers of ``logger`` (the root by default) that write to a stream, not a file."""
    logger = logger or logging.getLogger()
    return [
        h
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


def _not_a_step_line(record: logging.LogRecord) -> bool:
    return not getattr(record, STEP_LINE, False)


class _Prefixed(logging.Formatter):
    """Another formatter's lines, each behind a sweep job's label."""

    def __init__(self, inner: logging.Formatter | None, label: str):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.label = label

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.label} {self.inner.format(record)}"


class ConsoleFormatter(logging.Formatter):
    """The console's lines (conf/hydra/job_logging/pocketgpt.yaml): the message alone, as a print
    would show it; a warning or an error says so ("warning: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


def use_job_console(slot: JobSlot) -> None:
    """Make the root logger's console handlers show a sweep job's lines: behind its label,
    without step lines (its log file keeps everything). Hydra configures logging afresh for each
    job, so nothing carries over to the next one."""
    for handler in console_handlers():
        handler.setFormatter(_Prefixed(handler.formatter, slot.label))
        handler.addFilter(_not_a_step_line)


class _AboveTheBar(logging.Handler):
    """Stands in for a console handler while a bar is drawn: its lines go above the bar
    (tqdm.write), step lines not at all (the bar shows them)."""

    def __init__(self, console: logging.StreamHandler):
        super().__init__(console.level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if not _not_a_step_line(record) or not self.console.filter(record):
            return
        try:
            tqdm.write(self.console.format(record), file=self.console.stream)
        except Exception:
            self.handleError(record)


class TrainingProgress:
    """The bar (or its absence) and the loop's lines for one ``Trainer.fit``; a context manager.

    Inside it, console handlers write above the bar. Where nobody has configured logging (the
    library used from a script or a notebook), the lines go to stdout, as print would.
    ``shown=False`` (a distributed run's other ranks, whose figures rank 0 reports) shows nothing.
    """

    def __init__(
        self,
        total: int,
        initial: int,
        mode: Progress,
        slot: JobSlot | None = None,
        stream: TextIO | None = None,
        shown: bool = True,
    ):
        self.slot = slot if slot is not None else job_slot()
        self.shown = shown
        self.bar = None
        if shown and wants_bar(mode, stream):
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="train" + (f" {self.slot.label}" if self.slot else ""),
                unit="step",
                dynamic_ncols=True,
                position=self.slot.position if self.slot else None,
                file=stream,
            )
        self._swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []
        self._fallback: logging.Handler | None = None
        self._level = log.level

    def __enter__(self) -> TrainingProgress:
        if not log.hasHandlers():
            self._fallback = logging.StreamHandler(sys.stdout)
            self._fallback.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(self._fallback)
            log.setLevel(logging.INFO)
        if self.bar is not None:
            for logger in (logging.getLogger(), log):
                for console in console_handlers(logger):
                    self._swap(logger, console, _AboveTheBar(console))
        return self

    def __exit__(self, *exc) -> None:
        for logger, console, above in reversed(self._swapped):
            self._swap(logger, above, console)
        self._swapped.clear()
        if self.bar is not None:
            self.bar.close()
        if self._fallback is not None:
            log.removeHandler(self._fallback)
            log.setLevel(self._level)
            self._fallback = None

    def _swap(self, logger: logging.Logger, old: logging.Handler, new: logging.Handler) -> None:
        # In place: handlers run in their order (the console before the file, as configured).
        logger.handlers[logger.handlers.index(old)] = new
        if isinstance(new, _AboveTheBar):
            self._swapped.append((logger, old, new))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        """A log step: the bar's figures, and one line for the log (and a console without a bar)."""
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{metrics['train_loss']:.3f}",
                lr=f"{metrics['lr']:.2e}",
                tok_s=f"{metrics['tokens_per_sec']:.0f}",
            )
        if not self.shown:
            return
        log.info(
            "step %d/%d: train loss %.4f, lr %.2e, %.0f tokens/s, grad norm %.3f",
            step,
            total,
            metrics["train_loss"],
            metrics["lr"],
            metrics["tokens_per_sec"],
            metrics["grad_norm"],
            extra={STEP_LINE: True},
        )

    def line(self, message: str, level: int = logging.INFO) -> None:
        """An evaluation or a notice: on the console and in the log."""
        if self.shown:
            log.log(level, message)


def say(logger: logging.Logger, message: str) -> None:
    """A line of a job's story: through ``logger`` inside a Hydra job (the console and the job's
    train.log, as configured there), printed to stdout elsewhere (the library used from a
    script, a notebook or a test), where nobody has configured logging."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        logger.info(message)
    else:
        print(message, flush=True)
