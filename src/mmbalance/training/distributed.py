"""Multi-process training (``torchrun``): process group, data sharding, reductions.

Gradients are averaged by hand after backward instead of wrapping the model
in DistributedDataParallel: methods call ``encode``/``fuse``/``heads``
directly and several times per step, which DDP's forward-bound hooks do not
follow. One flat all-reduce per step costs the same communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_kind: str) -> "DistributedState":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        state = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        return state

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average a tensor of statistics over processes (every rank gets the result)."""
        return self.all_reduce_sum(values) / self.world_size if self.enabled else values

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def average_gradients(self, parameters: list[nn.Parameter]) -> None:
        if not self.enabled:
            return
        # a parameter without a gradient stays without one (so the optimizer skips it, as
        # set_to_none intends); every process runs the same code, so the set is the same on all
        params = [p for p in parameters if p.requires_grad and p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def broadcast_module(self, module: nn.Module) -> None:
        """Make every rank hold rank 0's parameters and buffers (e.g. BatchNorm statistics)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class ShardedShuffleSampler(torch.utils.data.Sampler):
    """A seeded per-epoch permutation, split across processes.

    The order depends only on (seed, epoch), so a resumed run sees the same
    batches as an uninterrupted one; with several processes each rank takes
    every world_size-th index of the permutation, padded for training so that
    all ranks step alike, unpadded for evaluation so that no sample counts twice.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, pad: bool = True):
        self.size = size
        self.pad = pad
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.world_size > 1:
            if self.pad:  # equal shards, so every process takes the same number of training steps
                per_rank = -(-self.size // self.world_size)
                order = order + order[: per_rank * self.world_size - self.size]
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size
        if self.pad:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))
