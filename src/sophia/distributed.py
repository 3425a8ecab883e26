"""Glue to torch.distributed for the optimizers: averaging estimates across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean"]


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameters), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


@torch.no_grad()
def all_reduce_mean(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Average ``tensors`` in place over the ranks of ``group`` (default: the world).

    DTensors are reduced shard by shard: a sharded parameter's estimate is already local to
    its shard, so the mean over ranks is taken over the data-parallel replicas of that shard.
    """
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return
    for tensor in tensors:
        local = _local(tensor)
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
        local.div_(world_size)
