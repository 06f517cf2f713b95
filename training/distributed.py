"""DistributedDataParallel plumbing (torchvision-references style): process group from torchrun's environment.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or per CPU worker) and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``. :func:`init_from_env` joins that group (NCCL on
CUDA, gloo on CPU) and is a no-op when ``WORLD_SIZE`` is absent or 1, so the same code runs single-process unchanged.
Every helper below degrades to the single-process answer when no group is initialised.

Rank 0 is the *main* process: it alone writes checkpoints, the model file, step markers and MLflow runs.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job (``world_size == 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (its rank variables are set), whatever the world size."""
    return all(k in os.environ for k in ENV_KEYS)


def env_info() -> DistInfo:
    """This process's rank and world size from torchrun's environment (rank 0 of 1 outside torchrun)."""
    if not launched_by_torchrun():
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0 of an initialised group; otherwise what torchrun's environment says (True outside torchrun)."""
    return rank() == 0 if is_initialized() else env_info().is_main


def init_from_env(device: str = "auto") -> DistInfo:
    """Join torchrun's process group: NCCL with one GPU per local rank when ``device`` resolves to CUDA, else gloo.

    A no-op (returns rank 0 of 1) when ``WORLD_SIZE`` is absent or 1, or when the group is already initialised.
    """
    info = env_info()
    if not info.distributed or is_initialized():
        return info
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {info.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                               f"set train.nproc (torchrun --nproc_per_node) to at most the number of GPUs")
        torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", info.local_rank))
    else:
        dist.init_process_group(backend="gloo")
    _exit_with_parent()
    return info


def cleanup() -> None:
    """Leave the process group (a no-op when none is initialised)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64; the values themselves when not distributed)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu().tolist()]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; tensors inside travel on CPU)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def average_buffers(module: torch.nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm running statistics) by its mean over the ranks, so that all
    ranks hold the same model (timm's ``--dist-bn reduce``). With ``broadcast_buffers=False`` each rank's running mean
    is an EMA of its own batch means, and their average is the EMA of the global batch means."""
    world = world_size()
    if world == 1:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b.data, op=dist.ReduceOp.SUM)
            b.data.div_(world)


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this worker if its parent (the torchrun agent) dies without stopping it, e.g. on SIGKILL.

    torchrun starts workers in their own sessions, so killing the launcher's process group would otherwise leave them
    training (and writing checkpoints) as orphans. A Kubernetes pod dies as a whole; this covers local runs.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="defectops-exit-with-parent", daemon=True).start()


__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "average_buffers",
    "barrier",
    "broadcast_object",
    "cleanup",
    "env_info",
    "init_from_env",
    "is_initialized",
    "is_main",
    "launched_by_torchrun",
    "rank",
    "world_size",
]
