"""Several processes, one training run: torch.distributed from torchrun's or SLURM's environment.

``torchrun --nproc_per_node=N -m pocketgpt.train`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; a SLURM job step (Hydra's submitit launcher) sets SLURM_PROCID and
SLURM_NTASKS, from which ``from_environment`` derives the same. ``Distributed`` is what the rest
of pocketgpt sees: this process's rank, the world size, and the few collectives the job needs
(sums of figures, one object broadcast from rank 0, a barrier). One process is the world of
size 1, where every collective is the identity, so the single-process path has no branches.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pocketgpt.config import Strategy
from pocketgpt.errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    """This process's place among the job's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its machine (its GPU on CUDA)
    strategy: Strategy = Strategy.single  # resolved: single, ddp or fsdp
    backend: str | None = None  # gloo or nccl when a process group is up

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that tracks, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Parameters are FSDP2 shards (DTensors) rather than whole tensors."""
        return self.active and self.strategy == Strategy.fsdp

    def sum(self, values: list[float], device: torch.device | None = None) -> list[float]:
        """Element-wise sums over all ranks (float64, so the order of additions barely shows)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device or self._device())
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj, src: int = 0):
        """``obj`` as rank ``src`` has it, on every rank (any picklable object)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._device())
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def describe(self) -> str:
        if not self.active:
            return "1 process"
        return f"{self.strategy} on {self.world_size} processes ({self.backend}), rank {self.rank}"


def from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else SLURM's, else (0, 1, 0)."""
    env = os.environ if environ is None else environ
    try:
        if "WORLD_SIZE" in env:
            return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
            return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"the launcher's environment does not say this process's rank ({e}); launch with "
            f"torchrun --nproc_per_node=N -m pocketgpt.train, or one process without it"
        ) from None
    return 0, 1, 0


def resolve_strategy(strategy: Strategy | str, world_size: int) -> Strategy:
    """auto -> ddp when launched as several processes, else single; single with several
    processes, or ddp/fsdp on one, is a mistake worth a clear line."""
    strategy = Strategy(strategy)
    if strategy == Strategy.auto:
        return Strategy.ddp if world_size > 1 else Strategy.single
    if strategy != Strategy.single and world_size == 1:
        raise ConfigError(
            f"trainer.strategy={strategy} needs several processes; launch with torchrun "
            f"--nproc_per_node=N -m pocketgpt.train ..., or use trainer.strategy=auto"
        )
    if strategy == Strategy.single and world_size > 1:
        raise ConfigError(
            f"trainer.strategy=single but the launcher started {world_size} processes; use "
            f"trainer.strategy=auto (ddp), or launch one process"
        )
    return strategy


def setup(
    strategy: Strategy | str,
    device: torch.device,
    rendezvous_timeout: float = 60.0,
    backend: str = "auto",
) -> Distributed:
    """Join the job's process group (when there is more than one process): ``backend`` auto
    is gloo on the CPU and nccl on CUDA, each CUDA process on its local GPU. A rendezvous
    address that does not answer within ``rendezvous_timeout`` seconds is a ConfigError naming
    it; nccl on a device other than CUDA is one too."""
    rank, world, local = from_environment()
    resolved = resolve_strategy(strategy, world)
    if world == 1:
        return Distributed(strategy=resolved)
    import torch.distributed as dist

    if str(backend) == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    backend = str(backend)
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"trainer.dist_backend=nccl, but this job runs on {device.type}: NCCL moves CUDA "
            "tensors only; use trainer.dist_backend=gloo (or auto), or trainer.device=cuda"
        )
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a SLURM step: rank 0's host, a port from the job
            _slurm_rendezvous()
        if rank > 0:
            _wait_for_rendezvous(rendezvous_timeout)
        dist.init_process_group(backend, rank=rank, world_size=world)
    return Distributed(rank, world, local, resolved, backend)


def teardown(d: Distributed) -> None:
    if d.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _wait_for_rendezvous(timeout: float) -> None:
    """Rank 0 hosts the rendezvous store; without this check a wrong MASTER_ADDR/PORT hangs
    every other rank for torch's default of 30 minutes."""
    import time

    host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline or isinstance(e, ValueError):
                raise ConfigError(
                    f"the rendezvous MASTER_ADDR={host} MASTER_PORT={port} did not answer "
                    f"within {timeout:.0f} s ({e}); check that rank 0 runs and that the "
                    f"address and port are reachable from this host"
                ) from None
            time.sleep(0.5)


def _slurm_rendezvous() -> None:
    """MASTER_ADDR/PORT for a SLURM step without torchrun: the first host of the job's node list
    (submitit's JobEnvironment knows it), and a port derived from the job id."""
    try:
        from submitit import JobEnvironment

        hosts = JobEnvironment().hostnames
        os.environ["MASTER_ADDR"] = hosts[0]
    except Exception:  # not under submitit: one node
        os.environ["MASTER_ADDR"] = socket.gethostname()
    job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    os.environ.setdefault("MASTER_PORT", str(20000 + job % 20000))


# --------------------------------------------------------------------------- the training module


class LossOf(torch.nn.Module):
    """``loss_fn(model, x, y)`` as a module's forward, so DDP's and FSDP's hooks (gradient
    averaging, parameter gathering) wrap the whole loss, fused head included."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, x, y)


def wrap(module: LossOf, d: Distributed, device: torch.device) -> torch.nn.Module:
    """The module each rank trains through: DDP (gradients averaged over ranks in backward), or
    FSDP2 (each block and the rest sharded over ranks, gathered for its forward and backward).
    One process: the module itself."""
    if not d.active:
        return module
    if d.strategy == Strategy.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in module.model.blocks:
            fully_shard(block)
        return fully_shard(module)  # the embeddings, final norm and head: one more unit
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # No buffers to broadcast, and a rank may run forwards its peers do not (sharded
    # evaluation goes through the plain model), so no collective in forward.
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


def gradient_sync(module: torch.nn.Module, sync: bool):
    """A context for one micro-batch's backward: without ``sync`` the gradients accumulate
    locally (all but the last micro-batch of a step), so a step costs one all-reduce."""
    import contextlib

    if sync:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def unsynced():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)

        return unsynced()
    return contextlib.nullcontext()


def full_state_dicts(
    module: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    d: Distributed,
) -> tuple[dict, dict]:
    """(model, optimizer) state dicts as one process would have them: FSDP2's shards gathered
    (a collective: every rank calls it), keys those of the plain model."""
    if d.strategy != Strategy.fsdp or not d.active:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(module, options=options)
    osd = get_optimizer_state_dict(module, optimizer, options=options)
    return _strip(sd), osd


def load_full_state_dicts(
    module: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: dict,
    optim_sd: dict,
    d: Distributed,
) -> None:
    """The inverse of ``full_state_dicts``: each rank loads a full checkpoint into its shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    if d.strategy != Strategy.fsdp or not d.active:
        model.load_state_dict(model_sd)
        if any(isinstance(key, str) for key in optim_sd.get("state", {})):
            # Written under FSDP: optimizer state keyed by parameter name, not position.
            set_optimizer_state_dict(module, optimizer, optim_sd, options=options)
        else:
            optimizer.load_state_dict(optim_sd)
        return
    set_model_state_dict(module, {f"model.{k}": v for k, v in model_sd.items()}, options=options)
    set_optimizer_state_dict(module, optimizer, optim_sd, options=options)


def _strip(sd: dict) -> dict:
    """LossOf's ``model.`` prefix off the keys: the plain GPTMini's state dict."""
    return {k.removeprefix("model."): v for k, v in sd.items()}
