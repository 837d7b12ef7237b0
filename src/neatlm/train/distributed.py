"""Multi-process data parallelism under ``torchrun`` (gloo on CPU, nccl on CUDA).

``torchrun --nproc_per_node=N -m neatlm train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them everything here is a no-op for one process. ``train.batch_size`` is the global batch:
every rank draws the same global batch from the seeded sampler and keeps its own rows, so a
run's data, and hence its losses, do not depend on the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import NeatError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch."""
        if batch % self.world:
            raise NeatError(f"train.batch_size = {batch}: must be divisible by the number of processes ({self.world})")
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def init_distributed(device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
