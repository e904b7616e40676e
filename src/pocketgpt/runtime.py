"""Runtime policy: which device, precision, compilation and threads a job runs with, and why.

Every choice that depends on the machine rather than on the experiment lives here, so the model
and the training loop stay free of it. ``Runtime.from_config`` makes the choices once per job.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
from dataclasses import dataclass, field

import torch

from pocketgpt.config import TrainerConfig
from pocketgpt.distributed import Distributed, setup
from pocketgpt.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """auto -> cuda, else mps, else cpu; an unknown or missing device is a ConfigError naming
    ``key`` (the setting it came from)."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"{key}={name!r} is not a torch device; use cpu, cuda, mps or auto"
        ) from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise ConfigError(f"{key}={name} but no {device.type} device is available; use {key}=cpu")
    return device


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
    """torch.autocast to the (resolved) precision; a no-op context for fp32."""
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


def tune_cpu_allocator() -> str:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every step.

    glibc serves blocks above its mmap threshold (at most 32 MB, so always the 64 MB logits at
    GPTMini's default shape) with fresh pages from the kernel and unmaps them on free, so every
    step pays page faults on first touch of each large tensor; raising the mmap and trim
    thresholds lets a step reuse the previous step's pages. Process-wide and idempotent (calling
    it again sets the same values), glibc only; returns what it did, for the log.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default malloc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        return "default malloc"
    return "glibc malloc keeps freed pages" if ok else "default malloc"


@dataclass(frozen=True)
class Runtime:
    """The machine's side of one job: where and how its tensors compute."""

    device: torch.device
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16
    compiled: bool = False  # the training forward goes through torch.compile
    threads: int | None = None  # requested torch intra-op threads; None = torch's default
    allocator: str = "default"  # what tune_cpu_allocator did, for the log
    auto_precision: bool = False  # precision and compile were chosen by "auto" (for the log)
    auto_compile: bool = False
    dist: Distributed = field(default_factory=Distributed)  # this process among the job's

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> Runtime:
        """Resolve trainer.device, precision and compile, join the job's process group when
        launched as several processes (torchrun, SLURM), and apply the process-wide settings
        (torch's thread count, the CPU allocator)."""
        device = resolve_device(cfg.device)
        dist = setup(cfg.strategy, device, backend=cfg.dist_backend)
        if device.type == "cuda" and dist.active:
            device = torch.device("cuda", dist.local_rank)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return cls(
            dist=dist,
            device=device,
            precision=resolve_precision(cfg.precision, device),
            compiled=should_compile(cfg.compile, device),
            threads=cfg.threads,
            allocator=tune_cpu_allocator() if device.type == "cpu" else "default",
            auto_precision=str(cfg.precision).lower() == "auto",
            auto_compile=str(cfg.compile).lower() == "auto",
        )

    @property
    def fused_head(self) -> bool:
        """Whether training's loss takes the fused chunked head + cross-entropy
        (``pocketgpt.fused_loss``): the CPU, fp32, eager."""
        return self.device.type == "cpu" and self.precision == "fp32" and not self.compiled

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def describe(self, optimizer: str) -> str:
        """One line: what was chosen for this device, and why (the trainer prints it)."""
        dev = self.device
        precision = self.precision + (f" (auto on {dev.type})" if self.auto_precision else "")
        compiled = ("on" if self.compiled else "off") + (
            f" (auto on {dev.type})" if self.auto_compile else ""
        )
        threads = f"{torch.get_num_threads()}" + ("" if self.threads else " (torch default)")
        return (
            f"trainer: device {dev}, precision {precision}, compile {compiled}, threads "
            f"{threads}, {optimizer}, "
            + ("fused chunked head+loss, " if self.fused_head else "")
            + self.allocator
            + (f", {self.dist.describe()}" if self.dist.active else "")
        )
