"""Multi-process runs (torchrun): process-group set-up and teardown, rank helpers, and the unpadded
evaluation shard with the gather that makes a distributed evaluation count every test image exactly once."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import ConfigError

__all__ = ["setup_distributed", "teardown_distributed", "resolve_device", "is_distributed", "rank_and_world",
           "ShardSampler", "all_gather_objects"]


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def teardown_distributed() -> None:
    """Destroy the process group if one is initialised (call at the end of a run, also on error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device` (auto | cpu | cuda) as a torch.device; this process's GPU under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, rank + 2·world, ... of a dataset of `length`: every index on exactly
    one rank, none repeated. (`DistributedSampler` pads the last round with repeated indices, so an
    evaluation over it would count those images twice.)

    Args:
        length: dataset size.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (`[obj]` without a process group). Objects travel pickled on
    the CPU: keep them small (per-sample results, not activations)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
