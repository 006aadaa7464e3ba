"""Data-parallel training under `torchrun`: one process per GPU (or per CPU worker, with gloo).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m convserve.training ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them a run is the usual single process.
Every rank holds the whole dataset, draws the same epoch permutation and trains on its own
shard of it (`shard`); DistributedDataParallel averages gradients. Only rank 0 writes: the
checkpoint, TensorBoard, progress events, and then the export, gate and publication, so a
data-parallel job publishes exactly one version.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_environment(environ: Mapping[str, str] | None = None) -> World:
    environ = os.environ if environ is None else environ
    world = World(rank=int(environ.get("RANK", "0")),
                  world_size=int(environ.get("WORLD_SIZE", "1")),
                  local_rank=int(environ.get("LOCAL_RANK", "0")))
    if not 0 <= world.rank < world.world_size:
        raise ValueError(f"RANK={world.rank} is out of range for WORLD_SIZE={world.world_size}")
    return world


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(order: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of an epoch's permutation: every world_size-th index from its rank."""
    return order[world.rank::world.world_size]


def all_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise sum over ranks (the tensor itself on a single process)."""
    if world.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor
