"""The trainers' side of the Hessian refresh: unwrap the optimizer, read the GradScaler.

The refresh itself — estimate, average over ranks, fold into h — is
:mod:`sophia_pytorch.refresh`, shared with the harness; these adapters give it what a trainer
holds:

* Sophia-G (:func:`gauss_newton_refresh`): one chunk, the forward of the *unwrapped* model
  (never through DistributedDataParallel, so the refresh may happen anywhere: inside
  ``no_sync``, outside a training step) under the trainer's autocast; targets drawn by the
  sampled loss the model's task calls for (``loss``), the loss scaled like the training loss
  under a GradScaler, gradients averaged over ranks with B the kept positions of all ranks.
* Sophia-H (:func:`hutchinson_refresh`): ``update_hessian(closure)`` with the loss scaled the
  same way; SophiaH averages its estimate over ranks itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from .. import refresh as _refresh
from ..optimizer import SophiaG, SophiaH
from ..refresh import SampledLoss

__all__ = ["find_sophia", "gauss_newton_refresh", "hutchinson_refresh", "LogitsAndMask"]

LogitsAndMask = tuple[Tensor, "Tensor | None"]
"""``(logits, mask)``: ``(..., C)`` outputs and an optional ``(...)`` bool tensor of the
positions to sample (True) — padding and positions without a next token are False."""


def find_sophia(optimizer: object) -> SophiaG | SophiaH:
    """The SophiaG/SophiaH inside ``optimizer``, unwrapping ``.optimizer`` attributes (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``).

    Args:
        optimizer: a SophiaG or SophiaH, or a wrapper holding one as ``.optimizer`` (up to
            eight wrappers deep).

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


def _grad_scale(scaler: torch.amp.GradScaler | None) -> float | None:
    return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None


def gauss_newton_refresh(
    optimizer: SophiaG,
    logits_and_mask: Callable[[], LogitsAndMask],
    *,
    loss: str | SampledLoss = "cross_entropy",
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast: contextlib.AbstractContextManager[object] | None = None,
    synchronize: bool = True,
) -> bool:
    """Refresh SophiaG's h from targets sampled from the model, on one batch.

    Clears the gradients of ``optimizer``'s parameters before and after (whatever they held —
    the training step has used them — is gone).

    Args:
        optimizer: the SophiaG whose h to refresh.
        logits_and_mask: runs the forward of the unwrapped model on the batch, returns
            ``(logits, mask)`` (see :data:`LogitsAndMask`); called under ``autocast``.
        loss: the sampled loss of the model's likelihood: ``"cross_entropy"`` (default),
            ``"gaussian"``, ``"bernoulli"`` or a callable (:mod:`sophia_pytorch.refresh`).
        generator: random source of the targets, on the logits' device (default: global).
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
    def chunk() -> LogitsAndMask:
        with autocast if autocast is not None else contextlib.nullcontext():
            return logits_and_mask()

    return _refresh.gauss_newton_bartlett(
        optimizer, [chunk], loss=loss, generator=generator, grad_scale=_grad_scale(scaler),
        synchronize=synchronize)


def hutchinson_refresh(
    optimizer: SophiaH,
    loss_fn: Callable[[], Tensor],
    *,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast: contextlib.AbstractContextManager[object] | None = None,
) -> bool:
    """Refresh SophiaH's h with one Hutchinson estimate on one batch.

    Args:
        optimizer: the SophiaH whose h to refresh.
        loss_fn: recomputes the training loss of the unwrapped model on the batch (a 0-dim
            tensor; no backward); called under ``autocast`` and the math attention backend.
        generator: random source of the probes; seed it the same on every rank, so that the
            ranks' estimates (averaged by SophiaH) use the same probes (default: global).
        scaler: the GradScaler of the training step, or None (default): as in
            :func:`gauss_newton_refresh`.
        autocast: the mixed-precision context of the training forward (default None: none).

    Returns:
        True when the estimate was folded into h; False when skipped (not finite, under a
        ``scaler``).
    """
    def loss_in_autocast() -> Tensor:
        with autocast if autocast is not None else contextlib.nullcontext():
            return loss_fn()

    return _refresh.hutchinson(optimizer, loss_in_autocast, generator=generator,
                               grad_scale=_grad_scale(scaler))
