"""One Hessian refresh on one batch, framework-free: what the trainer integrations call.

A trainer owns the batch, the model, the loss scaler and the data-parallel world; these
functions own the refresh itself, so that the Hugging Face and Lightning integrations (and a
hand-written loop) do it the same way:

* Sophia-G (:func:`gauss_newton_refresh`): forward, labels drawn from the model's softmax at
  the positions the mask keeps, backward of their mean cross-entropy — scaled like the training
  loss under a GradScaler — gradients averaged over data-parallel ranks, then
  ``update_hessian(scale=B, grad_scale=…)`` with B the kept positions of *all* ranks. Each
  rank's loss is weighted by its share of B, so the averaged gradient is that of the mean over
  the global batch even when padding leaves the ranks unequal counts.
* Sophia-H (:func:`hutchinson_refresh`): ``update_hessian(closure)`` with the loss scaled the
  same way; SophiaH averages its estimate over ranks itself.

The forward runs on the *unwrapped* model, never through DistributedDataParallel: the refresh
may then happen anywhere (inside ``no_sync``, outside a training step) and its gradients are
averaged here with one bucketed all-reduce. Parameters sharded by FSDP2 (DTensor gradients,
already reduce-scattered) are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .._dtensor import all_reduce_mean, is_dtensor
from ..estimators import sampled_cross_entropy
from ..optimizer import SophiaG, SophiaH

__all__ = ["find_sophia", "gauss_newton_refresh", "hutchinson_refresh", "LogitsAndMask"]

LogitsAndMask = tuple[Tensor, "Tensor | None"]
"""``(logits, mask)``: ``(..., C)`` scores and an optional ``(...)`` bool tensor of the positions
to sample (True) — padding and positions without a next token are False."""


def find_sophia(optimizer: object) -> SophiaG | SophiaH:
    """The SophiaG/SophiaH inside ``optimizer``, unwrapping ``.optimizer`` attributes (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``).

    Raises:
        TypeError: when there is none, naming what was found.
    """
    found = optimizer
    for _ in range(8):
        if isinstance(found, (SophiaG, SophiaH)):
            return found
        if not hasattr(found, "optimizer"):
            break
        found = found.optimizer
    raise TypeError(
        f"the Hessian refresh needs a sophia_pytorch SophiaG or SophiaH optimizer, got "
        f"{type(found).__name__}"
    )


def _data_parallel_world(synchronize: bool) -> int:
    if not synchronize or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _zero_grads(optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)


def gauss_newton_refresh(
    optimizer: SophiaG,
    logits_and_mask: Callable[[], LogitsAndMask],
    *,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    synchronize: bool = True,
) -> bool:
    """Refresh SophiaG's h from labels sampled from the model, on one batch.

    Clears the gradients of ``optimizer``'s parameters before and after (whatever they held —
    the training step has used them — is gone).

    Args:
        optimizer: the SophiaG whose h to refresh.
        logits_and_mask: runs the forward of the unwrapped model on the batch, returns
            ``(logits, mask)`` (see :data:`LogitsAndMask`); called under ``autocast``.
        generator: random source of the labels, on the logits' device (default: global).
        scaler: the GradScaler of the training step, or None. The loss is multiplied by its
            current scale before backward and ``update_hessian`` unscales; the scaler's own
            state (scale, growth tracker, per-optimizer records) is not touched.
        autocast: the mixed-precision context of the training forward (default: none).
        synchronize: average the gradients and sum B over the default process group when one
            is initialised (default True); False for a process group that is not data-parallel.

    Returns:
        True when the estimate was folded into h; False when it was skipped because a
        gradient was not finite (only under a ``scaler``).
    """
    world = _data_parallel_world(synchronize)
    _zero_grads(optimizer)
    with autocast if autocast is not None else contextlib.nullcontext():
        logits, mask = logits_and_mask()
    loss, count = sampled_cross_entropy(
        logits, mask=mask, generator=generator, count_as_tensor=True
    )
    total = count
    if world > 1:
        total = count.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        # the all-reduce below averages per-rank means; weight each by its share of B
        loss = loss * (count.to(loss.dtype) * world / total.clamp(min=1).to(loss.dtype))
    grad_scale = None
    if scaler is not None and scaler.is_enabled():
        grad_scale = scaler.get_scale()
        loss = loss * grad_scale
    loss.backward()
    if world > 1:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None and not is_dtensor(p.grad)]
        all_reduce_mean(grads)
    folded = optimizer.update_hessian(scale=total, grad_scale=grad_scale)
    _zero_grads(optimizer)
    return folded


def hutchinson_refresh(
    optimizer: SophiaH,
    loss_fn: Callable[[], Tensor],
    *,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> bool:
    """Refresh SophiaH's h with one Hutchinson estimate on one batch.

    Args:
        optimizer: the SophiaH whose h to refresh.
        loss_fn: recomputes the training loss of the unwrapped model on the batch (a 0-dim
            tensor; no backward); called under ``autocast`` and the math attention backend.
        generator: random source of the probes; seed it the same on every rank, so that the
            ranks' estimates (averaged by SophiaH) use the same probes (default: global).
        scaler, autocast: as in :func:`gauss_newton_refresh`.

    Returns:
        True when the estimate was folded into h; False when skipped (not finite, under a
        ``scaler``).
    """
    grad_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
    context = autocast if autocast is not None else contextlib.nullcontext()

    def closure() -> Tensor:
        with context:
            loss = loss_fn()
        return loss * grad_scale if grad_scale is not None else loss

    folded = optimizer.update_hessian(closure, generator=generator, grad_scale=grad_scale)
    return folded
