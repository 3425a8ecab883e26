"""Glue between the optimizers and torch.distributed: DTensor shards, cross-rank reductions.

Under DistributedDataParallel every rank holds whole parameters and identical gradients, so
the optimizers need nothing from here but :func:`all_reduce_mean` (SophiaH's estimate comes
from a double backward, which DDP's reducer never sees). Under FSDP2 (``fully_shard``) the
parameters, their gradients and the optimizer state are DTensors sharded over ranks; the
optimizers update their local shards as plain tensors (:func:`local_shards`) — elementwise
maths needs no communication, and torch's DTensor dispatch costs several times the update
itself (see ``benchmarks/dtensor_step.py``) — and sum diagnostics over shards
(:func:`sum_over_shards`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Placement

__all__ = ["all_reduce_mean", "is_dtensor", "local_shards", "sum_over_shards"]


def _import_dtensor() -> ModuleType | None:
    """torch's DTensor module (public since torch 2.5, private in 2.4); None without it."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


_DTENSOR_MODULE = _import_dtensor()
_DTENSOR_TYPE: type[DTensor] | None = (
    None if _DTENSOR_MODULE is None else _DTENSOR_MODULE.DTensor)


def is_dtensor(tensor: object) -> TypeGuard[DTensor]:
    """True for a DTensor (FSDP2 or tensor-parallel parameter, gradient or state)."""
    return _DTENSOR_TYPE is not None and isinstance(tensor, _DTENSOR_TYPE)


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_shards(param: Tensor, *tensors: Tensor) -> list[Tensor]:
    """``param`` and ``tensors`` (its gradient, its state) as the plain tensors of this rank.

    For a DTensor ``param`` the result holds the local shards, which alias the DTensors'
    storage: updating them in place updates the DTensors. A tensor laid out differently from
    ``param`` is first redistributed to its placements. Plain tensors come back unchanged.
    Call under ``torch.no_grad()``: autograd forbids in-place updates of ``to_local`` views.
    """
    if not is_dtensor(param):
        return [param, *tensors]
    shards = [param.to_local()]
    for tensor in tensors:
        if is_dtensor(tensor) and tensor.placements != param.placements:
            tensor = tensor.redistribute(param.device_mesh, param.placements)
        shards.append(_local(tensor))
    return shards


def sum_over_shards(counts: Iterable[tuple[Tensor, int, int]]) -> tuple[int, int]:
    """Totals of two per-tensor counts measured on local shards, summed over whole tensors.

    Args:
        counts: ``(tensor, a, b)`` triples, ``a`` and ``b`` counted on ``tensor``'s local
            shard (for :meth:`unclipped_fraction`: unclipped coordinates, coordinates).

    Returns:
        ``(sum of a, sum of b)`` over the whole tensors: a DTensor's counts are summed over
        the ranks holding its other shards (one all-reduce per mesh and layout, never over
        its replicas); a plain tensor's are taken as they are. A collective when any tensor
        is a DTensor: every rank of its mesh must call it, with its tensors in the same order.
    """
    total_a = total_b = 0
    by_layout: dict[tuple[DeviceMesh, tuple[Placement, ...]], list[int]] = {}
    for tensor, a, b in counts:
        if is_dtensor(tensor):
            key = (tensor.device_mesh, tuple(tensor.placements))
            sums = by_layout.setdefault(key, [0, 0])
            sums[0] += a
            sums[1] += b
        else:
            total_a += a
            total_b += b
    for (mesh, placements), sums in by_layout.items():
        assert _DTENSOR_MODULE is not None  # by_layout holds DTensors' layouts only
        local = torch.tensor(sums, dtype=torch.int64, device=mesh.device_type)
        layout = [_DTENSOR_MODULE.Partial() if placement.is_shard()
                  else _DTENSOR_MODULE.Replicate() for placement in placements]
        a, b = _DTENSOR_MODULE.DTensor.from_local(local, mesh, layout).full_tensor().tolist()
        total_a += a
        total_b += b
    return total_a, total_b


_BUCKET_BYTES = 32 * 2**20


def _buckets(tensors: list[Tensor]) -> Iterable[list[Tensor]]:
    """``tensors`` in runs of one device and dtype of at most ~32 MiB each, in order."""
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (
            (tensor.device, tensor.dtype) != (bucket[0].device, bucket[0].dtype)
            or size + nbytes > _BUCKET_BYTES
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_mean(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Average ``tensors`` in place over the ranks of ``group`` (default: the world).

    Args:
        tensors: plain tensors of the same shapes on every rank (replicas, as under DDP),
            in the same order; flattened into buckets of ~32 MiB, one all-reduce each.
        group: the process group (default: the world).

    Raises:
        TypeError: for a DTensor, whose ranks hold different shards, not replicas.
    """
    if any(is_dtensor(tensor) for tensor in tensors):
        raise TypeError("all_reduce_mean averages replicas; got a DTensor, which is sharded")
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return
    for bucket in _buckets(tensors):
        flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world_size)
        parts = torch.split(flat, [t.numel() for t in bucket])
        for tensor, part in zip(bucket, parts, strict=True):
            tensor.copy_(part.view_as(tensor))
