"""Process-group helpers: the same script runs alone or under ``torchrun --nproc_per_node N``.

Backend: nccl on CUDA, gloo on CPU. Every helper is a no-op (or the identity) in a single process.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, List

import torch
import torch.distributed as torch_dist

from .config import ConfigError


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int  # this process's rank
    world_size: int  # number of processes
    device: torch.device  # where this process computes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def torchrun_command(nproc: int, *target: str) -> List[str]:
    """The command line that runs ``target`` (a script and its arguments, or ``-m module ...``) in ``nproc``
    processes on this machine with this Python (``torchrun --standalone``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target]


def env_world_size() -> int:
    """Number of processes of this run: torchrun's WORLD_SIZE, 1 when launched plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda (this process's GPU) when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world_size = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = torch_dist.get_rank() if world_size > 1 else 0
    return DistInfo(rank, world_size, device)


def shutdown(info: DistInfo) -> None:
    """Leave the process group once every process is done (no process tears down a peer's connections)."""
    if info.active and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when several processes run, else itself."""
    if not info.active:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def all_gather_rows(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equally sized (B, ...) tensors of every rank along dim 0, in rank order."""
    if not info.active:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise sum over ranks (returns a new tensor)."""
    out = tensor.clone()
    if info.active:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.active:
        return [obj]
    out: List[Any] = [None] * info.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not info.active:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.active:
        torch_dist.barrier()


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise maximum over ranks (returns a new tensor), e.g. so that every rank runs as many passes."""
    out = tensor.clone()
    if info.active:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)
    return out
