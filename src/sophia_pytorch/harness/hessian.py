"""Sophia's Hessian refresh in the training loop, chosen once when the optimizer is built.

The loop asks its :class:`HessianRefresh` twice a step, before the step's backward and after
``optimizer.step()``; the refresh runs when the optimizer's ``hessian_due()`` says one is owed
(after steps k, 2k, ...; before the first step too with ``refresh_at_start``). It estimates
the diagonal Hessian on the first ``refresh_fraction`` of the step's own batch, through the
library's one refresh (:mod:`sophia_pytorch.refresh`), which these classes only feed:

- :class:`GaussNewtonBartlett` (Sophia-G): each micro-batch slice a chunk, forwarded through
  the training wrapper (DDP under ``no_sync``: the refresh averages over ranks itself, once),
  labels sampled from the model's softmax;
- :class:`Hutchinson` (Sophia-H): a Hessian-vector product with a random probe, on at most
  one micro-batch.

The draws of a refresh are seeded by :func:`sophia_pytorch.refresh.refresh_generator` from
the run's seed, the step and the rank.

Optimizers without a Hessian (AdamW, Lion, Muon) get :class:`NoRefresh`.
"""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor, nn

from .. import refresh as sophia_refresh
from ..optimizer import SophiaBase, SophiaG, SophiaH
from .model import lm_loss

__all__ = ["GaussNewtonBartlett", "HessianRefresh", "Hutchinson", "NoRefresh", "SophiaRefresh"]

Batch = tuple[Tensor, Tensor]
Autocast = Callable[[], contextlib.AbstractContextManager]
_Sophia = TypeVar("_Sophia", bound=SophiaBase)


class HessianRefresh(abc.ABC):
    """What the loop asks of a Hessian refresh, twice a step (see the module's docstring)."""

    @abc.abstractmethod
    def __call__(self, micro_batches: Sequence[Batch], key: int) -> bool:
        """Refresh if one is owed, on ``micro_batches``; return whether it ran.

        ``key`` (an int) seeds the refresh's random draws together with the run's seed and
        rank: the loop passes the index of the step after which the refresh falls.
        """

    @abc.abstractmethod
    def unclipped_fraction(self) -> float | None:
        """Sophia's share of coordinates the clip leaves alone; None without a Hessian."""


class NoRefresh(HessianRefresh):
    """No Hessian: never refreshes, reports no clip statistic (AdamW, Lion, Muon)."""

    def __call__(self, micro_batches: Sequence[Batch], key: int) -> bool:
        """Never refreshes: returns False."""
        return False

    def unclipped_fraction(self) -> float | None:
        """None: there is no clip."""
        return None


class SophiaRefresh(HessianRefresh, Generic[_Sophia]):
    """Asks the optimizer whether a refresh is owed and seeds its random draws.

    An optimizer that holds a Sophia for part of the model (``muon-sophiag``) names it as its
    ``hessian_optimizer``; that part is refreshed.

    Raises:
        TypeError: when ``optimizer`` is not (and holds no) Sophia the subclass refreshes.
    """

    same_draws_on_every_rank = False
    sophia_class: type[_Sophia]
    """The optimizer the subclass refreshes."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *, rows: int,
                 autocast: Autocast, seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
        optimizer = getattr(optimizer, "hessian_optimizer", optimizer)
        if not isinstance(optimizer, self.sophia_class):
            raise TypeError(
                f"{type(self).__name__} refreshes a sophia_pytorch "
                f"{self.sophia_class.__name__}, got {type(optimizer).__name__}"
            )
        self.optimizer: _Sophia = optimizer
        self.model = model
        self.rows = rows
        self.autocast = autocast
        self.seed = seed
        self.rank = 0 if self.same_draws_on_every_rank else rank
        self.world_size = world_size
        self.device = device

    def __call__(self, micro_batches: Sequence[Batch], key: int) -> bool:
        if not self.optimizer.hessian_due():
            return False
        generator = sophia_refresh.refresh_generator(self.seed, key, rank=self.rank,
                                                     device=self.device)
        return self.estimate(micro_batches, generator)

    def estimate(self, micro_batches: Sequence[Batch], generator: torch.Generator) -> bool:
        """One refresh on ``micro_batches``; whether it was folded into h."""
        raise NotImplementedError

    def unclipped_fraction(self) -> float | None:
        return self.optimizer.unclipped_fraction()


class GaussNewtonBartlett(SophiaRefresh[SophiaG]):
    """Sophia-G's estimator: sampled labels, the mean sampled loss, ``scale`` = positions.

    Each rank samples its own labels (a different draw per rank averages better).
    """

    sophia_class = SophiaG

    def estimate(self, micro_batches: Sequence[Batch], generator: torch.Generator) -> bool:
        chunks, remaining = [], self.rows
        for x, _ in micro_batches:
            if remaining <= 0:
                break
            take = min(remaining, x.shape[0])
            remaining -= take
            chunks.append(functools.partial(self._forward, x[:take]))
        return sophia_refresh.gauss_newton_bartlett(
            self.optimizer, chunks, generator=generator,
            synchronize=self.world_size > 1)

    def _forward(self, x: Tensor) -> tuple[Tensor, None]:
        with _without_ddp_sync(self.model), self.autocast():
            return self.model(x), None


def _without_ddp_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for a DDP-wrapped (maybe compiled) model, else nothing: FSDP2's
    gradients must still be reduce-scattered into their shards."""
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()


class Hutchinson(SophiaRefresh[SophiaH]):
    """Sophia-H's estimator: a closure that recomputes the loss, for a Hessian-vector product.

    Every rank draws the same probe, so the ranks' averaged estimates stay one estimate.
    """

    same_draws_on_every_rank = True
    sophia_class = SophiaH

    def estimate(self, micro_batches: Sequence[Batch], generator: torch.Generator) -> bool:
        x, y = micro_batches[0]
        x, y = x[:self.rows], y[:self.rows]  # one micro-batch at most: double backward

        def loss() -> Tensor:
            with self.autocast():
                return lm_loss(self.model(x), y)

        return sophia_refresh.hutchinson(self.optimizer, loss,
                                         generator=generator)
