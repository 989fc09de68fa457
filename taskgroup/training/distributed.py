"""Multi-process training under ``torchrun``: DistributedDataParallel with NCCL on GPUs and gloo
on CPUs, with no change for the user (the launcher's environment variables decide).

Every rank draws the same task and the same batch positions from the sampler (same seed) and
takes its shard ``positions[rank::world]``; DDP averages the gradients, which for equal shards is
the gradient of the whole batch's mean loss, so N processes train like one process with the
same total batch. Only rank 0 writes files and shows progress; evaluation runs on every rank on
the whole validation split (it is small next to training), so every rank keeps the same state.
Buffers follow rank 0 (DDP broadcasts them): the MoE expert-load counts are rank 0's shard.

    torchrun --nproc_per_node 8 -m taskgroup train --data ROOT --grouping au --out RUN
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from taskgroup.runtime import pick_device


@dataclasses.dataclass(frozen=True)
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


def init_distributed(device_preference: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), pick_device(device_preference)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, world, local_rank), device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
