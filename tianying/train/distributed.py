"""torchrun support: process-group setup and DDP / FSDP2 wrapping, the same on CPU (gloo) and GPU (nccl).

FSDP2's `fully_shard` shards parameters, gradients and optimizer state (ZeRO-3); each decoder block is its
own unit so only one block's full weights exist at a time; `cpu_offload` keeps the shards in host memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the torchrun process group (if launched by torchrun) and choose this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(model: nn.Module, info: DistInfo, strategy: str = "ddp", cpu_offload: bool = False) -> nn.Module:
    """The module to call for forward/backward: `model` itself, a DDP wrapper, or `model` sharded in place."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        kw = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
        for block in model.model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    raise ValueError(f"distributed strategy {strategy!r}: expected ddp or fsdp")


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())
