"""Data-parallel training on PyTorch's own engine: torchrun, DDP and FSDP2, for the harness.

One process per device, started by ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous in the environment. :func:`init_from_env` joins the process
group (NCCL on CUDA, gloo on CPU) and says who this process is; :func:`wrap_model` hands the
model to DistributedDataParallel or to FSDP2 (``fully_shard``); :func:`gradient_sync` skips
the gradient reduction on all but the last micro-batch of an accumulated step; and
:func:`save_sharded` / :func:`load_sharded` write and read FSDP2 model and optimizer state
with ``torch.distributed.checkpoint``, which can reshard it onto a different number of ranks.

Without torchrun's variables everything here degrades to one process: no group, rank 0,
``wrap_model(..., "none")``, and the reductions return their input.

What the optimizers support (see ``docs/DISTRIBUTED.md``): SophiaG on DDP and FSDP2, SophiaH
on DDP (its Hutchinson estimate is averaged across ranks); SophiaH refuses FSDP2 parameters.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._dtensor import is_dtensor
from .errors import SophiaError

__all__ = [
    "ParallelEnv",
    "barrier",
    "destroy",
    "full_tensor",
    "global_num_samples",
    "gradient_sync",
    "init_from_env",
    "is_initialized",
    "is_main_process",
    "load_sharded",
    "mean_over_ranks",
    "resolve_device",
    "save_sharded",
    "wrap_model",
]

ParallelMode = Literal["none", "ddp", "fsdp"]
PARALLEL_MODES: tuple[str, ...] = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class ParallelEnv:
    """Who this process is in a data-parallel job.

    Attributes:
        rank: global rank, 0 … world_size − 1.
        world_size: number of processes in the job (1 without torchrun).
        local_rank: rank on this node; the index of this process's GPU.
        device: the device this process computes on.
        is_main: True on rank 0, the one that logs, shows progress and writes files.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def is_initialized() -> bool:
    """True inside a process group (torch.distributed available and initialised)."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """The one answer to "is this the main process": rank 0 of the process group, or the
    only process without one. The main process logs, shows progress and writes files."""
    return not is_initialized() or dist.get_rank() == 0


def resolve_device(name: str | torch.device) -> torch.device:
    """The device ``name`` means here — the one place ``"auto"`` is resolved: CUDA if a GPU
    is visible, else CPU. A named device must exist (``cpu``, ``cuda[:N]``, ``mps``).

    Raises:
        SophiaError: an unknown device, or one this machine does not have.
    """
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps") or (
            device.type == "cpu" and device.index not in (None, 0)):
        raise SophiaError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SophiaError("device mps was asked for but this machine has none; use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SophiaError("device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(
    device: str | torch.device = "auto",
    *,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> ParallelEnv:
    """Join the process group torchrun describes in the environment, or run as one process.

    Args:
        device: ``"auto"`` (this process's GPU if CUDA is available, else CPU), ``"cpu"`` or
            ``"cuda"``; under torchrun a CUDA process uses GPU ``LOCAL_RANK`` (an explicit
            index is ignored, as every process would otherwise pick the same GPU).
        backend: the torch.distributed backend; default NCCL for CUDA, gloo for CPU.
        timeout: how long a collective may wait for the other ranks (default 10 minutes).

    Returns:
        a :class:`ParallelEnv`. With ``RANK`` and ``WORLD_SIZE`` unset there is no group:
        rank 0 of 1. An already initialised group is joined as it is, not re-created.
    """
    requested = resolve_device(device) if str(device) == "auto" else torch.device(device)
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is None or world_size is None:
        if is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            return ParallelEnv(0, 1, 0, requested, True)
    local_rank = _env_int("LOCAL_RANK")
    local_rank = rank if local_rank is None else local_rank
    if requested.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for but no CUDA GPU is visible")
        requested = torch.device("cuda", local_rank)
        torch.cuda.set_device(requested)
    if not is_initialized():
        backend = backend or ("nccl" if requested.type == "cuda" else "gloo")
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timeout,
            device_id=requested if requested.type == "cuda" else None,
        )
    return ParallelEnv(rank, world_size, local_rank, requested, rank == 0)


def destroy() -> None:
    """Leave the process group, if there is one (call once, at the end of the job)."""
    if is_initialized():
        barrier()  # together: a rank that leaves early can abort another's teardown
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# ----------------------------------------------------------------------------- wrapping
def wrap_model(
    model: nn.Module,
    mode: ParallelMode,
    *,
    device: torch.device | None = None,
    shard_units: Iterable[nn.Module] = (),
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
) -> nn.Module:
    """Hand ``model`` (already on its device) to DDP or FSDP2; build the optimizer after.

    Args:
        model: the module to train, with identical initial parameters on every rank (seed
            the same; DDP broadcasts rank 0's anyway, FSDP2 shards what each rank holds).
        mode: ``"none"`` returns ``model``; ``"ddp"`` wraps it in DistributedDataParallel;
            ``"fsdp"`` applies ``fully_shard`` to each of ``shard_units`` and then to
            ``model``, in place: its parameters become DTensors sharded over the ranks.
        device: for DDP on CUDA, the process's GPU (default: the parameters' device).
        shard_units: FSDP2 only: submodules sharded, gathered and freed one at a time, e.g.
            a transformer's blocks (default none: the whole model is one unit). Weights tied
            across units are not supported by FSDP2; keep them in the root.
        reshard_after_forward: FSDP2 only: free gathered parameters after forward (default
            True, the least memory; False keeps them until backward).
        mp_policy: FSDP2 only: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (default
            None: parameters and reductions in the parameters' dtype).

    Returns:
        the module to call in the training loop: ``model`` itself for "none" and "fsdp",
        the DDP wrapper for "ddp" (whose ``.module`` is ``model``). The optimizer must be
        built on ``model.parameters()`` after this call, so that under FSDP2 it holds the
        sharded parameters. Compile (``torch.compile``) the returned module, not the input.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; use one of {PARALLEL_MODES}")
    if mode == "none":
        return model
    if not is_initialized():
        raise RuntimeError(f"--parallel {mode} needs a process group: launch with torchrun")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = device or next(model.parameters()).device
        device_ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    options["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for unit in shard_units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this block's backward only if ``enabled``.

    Gradient accumulation over micro-batches needs the reduction once, on the last one::

        for index, (x, y) in enumerate(micro_batches):
            with gradient_sync(train_model, enabled=index == len(micro_batches) - 1):
                loss = loss_fn(train_model(x), y) / len(micro_batches)
                loss.backward()

    Put the forward inside too: DDP decides at forward time. Under DDP this is ``no_sync``;
    under FSDP2 ``set_requires_gradient_sync(False)`` (gradients then accumulate unsharded
    until the synced backward, which costs memory); without either, it does nothing.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    model = _unwrapped(model)
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# --------------------------------------------------------------------------- reductions
def _reduction_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_num_samples(local_num_samples: int) -> int:
    """The sum of ``local_num_samples`` over all ranks: SophiaG's ``update_hessian`` scale.

    With the sampled-label loss a mean over this rank's B_r positions, DDP's (and FSDP2's)
    gradient averaging gives the gradient of the mean over all of them when every rank has
    the same B_r; ``scale`` must then be ΣB_r, which this returns (its input without a group).
    """
    if not is_initialized():
        return int(local_num_samples)
    total = torch.tensor(int(local_num_samples), dtype=torch.int64, device=_reduction_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def mean_over_ranks(value: float | Tensor) -> float:
    """The mean of a scalar over all ranks (a rank's training loss, say); itself alone."""
    if isinstance(value, Tensor):
        value = float(full_tensor(value.detach()).item())
    if not is_initialized():
        return float(value)
    total = torch.tensor(float(value), dtype=torch.float64, device=_reduction_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item()) / dist.get_world_size()


def full_tensor(tensor: Tensor) -> Tensor:
    """A DTensor gathered (or reduced) into a plain tensor on every rank; others unchanged.

    Use it on what FSDP2 code returns as DTensors before ``.item()``, which would otherwise
    read this rank's share alone: e.g. the total norm from ``clip_grad_norm_``.
    """
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


# --------------------------------------------------------------------------- checkpoints
def save_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write model and optimizer state with ``torch.distributed.checkpoint`` (a collective).

    Every rank writes its own shards into ``folder`` (a new folder: writing over an older
    checkpoint is not atomic); rank 0 writes the metadata last. Meant for FSDP2 runs; a DDP
    or single-process model works too. Pair it with :func:`load_sharded`.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    model_state, optimizer_state = get_state_dict(_unwrapped(model), optimizer)
    with warnings.catch_warnings():  # saving from one process is what no_dist asks for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=str(folder), no_dist=not is_initialized())


def load_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what :func:`save_sharded` wrote into ``model`` and ``optimizer`` (a collective).

    The job may have another number of ranks than the one that saved, or none: DCP
    reshards DTensor state to the layout of ``model``'s parameters (FSDP2 on any number of
    ranks, or plain tensors in one process).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    model = _unwrapped(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # loading in one process is what no_dist asks for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(state, checkpoint_id=str(folder), no_dist=not is_initialized())
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
