"""Sophia's Hessian refresh in the training loop, chosen once when the optimizer is built.

The loop asks its :class:`HessianRefresh` twice a step, before the step's backward and after
``optimizer.step()``; the refresh runs when the optimizer's ``hessian_due()`` says one is owed
(after steps k, 2k, ...; before the first step too with ``refresh_at_start``). It estimates
the diagonal Hessian on the first ``refresh_fraction`` of the step's own batch:

- :class:`GaussNewtonBartlett` (Sophia-G): labels sampled from the model's softmax
  (``sampled_cross_entropy``), the mean sampled loss over B positions back-propagated,
  ``update_hessian(scale=B)``;
- :class:`Hutchinson` (Sophia-H): ``update_hessian(closure)``, a Hessian-vector product with
  a random probe, on at most one micro-batch.

Optimizers without a Hessian (AdamW, Lion, Muon) get the base class, which never refreshes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .model import lm_loss

__all__ = ["GaussNewtonBartlett", "HessianRefresh", "Hutchinson"]

Batch = tuple[Tensor, Tensor]
Autocast = Callable[[], contextlib.AbstractContextManager]


class HessianRefresh:
    """No Hessian: never refreshes, reports no clip statistic (AdamW, Lion, Muon)."""

    def __call__(self, micro_batches: Sequence[Batch], key: int) -> bool:
        """Refresh if one is owed, on ``micro_batches``; return whether it ran.

        ``key`` (an int) seeds the refresh's random draws together with the run's seed and
        rank: the loop passes the index of the step after which the refresh falls.
        """
        return False

    def unclipped_fraction(self) -> float | None:
        """Sophia's share of coordinates the clip leaves alone; None without a Hessian."""
        return None


class _SophiaRefresh(HessianRefresh):
    """Asks the optimizer whether a refresh is owed and seeds its random draws."""

    same_draws_on_every_rank = False

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *, rows: int,
                 autocast: Autocast, seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.optimizer = optimizer
        self.model = model
        self.rows = rows
        self.autocast = autocast
        self.seed = seed
        self.rank = 0 if self.same_draws_on_every_rank else rank
        self.world_size = world_size
        self.device = device

    def __call__(self, micro_batches: Sequence[Batch], key: int) -> bool:
        if not self.optimizer.hessian_due():  # type: ignore[attr-defined]
            return False
        generator = torch.Generator(self.device).manual_seed(
            ((self.seed * 1_000_003 + key) * self.world_size + self.rank) % 2**32)
        self.estimate(micro_batches, generator)
        return True

    def estimate(self, micro_batches: Sequence[Batch], generator: torch.Generator) -> None:
        raise NotImplementedError

    def unclipped_fraction(self) -> float | None:
        return self.optimizer.unclipped_fraction()  # type: ignore[attr-defined]


class GaussNewtonBartlett(_SophiaRefresh):
    """Sophia-G's estimator: sampled labels, the mean sampled loss, ``scale`` = positions.

    Each rank samples its own labels (a different draw per rank averages better).
    """

    def estimate(self, micro_batches: Sequence[Batch], generator: torch.Generator) -> None:
        import sophia_pytorch

        total_samples = self.rows * micro_batches[0][0].shape[1]
        remaining = self.rows
        for x, _ in micro_batches:
            if remaining <= 0:
                break
            take = min(remaining, x.shape[0])
            remaining -= take
            with self.autocast():
                logits = self.model(x[:take])
            loss, num_samples = sophia_pytorch.sampled_cross_entropy(logits, generator=generator)
            # Weighted so p.grad is the gradient of the mean over all `total_samples` positions.
            (loss * (num_samples / total_samples)).backward()
        # Under DDP/FSDP2 p.grad is the mean over the ranks' (equal) means: B counts every rank.
        self.optimizer.update_hessian(  # type: ignore[attr-defined]
            scale=distributed.global_num_samples(total_samples))
        self.optimizer.zero_grad(set_to_none=True)


class Hutchinson(_SophiaRefresh):
    """Sophia-H's estimator: a closure that recomputes the loss, for a Hessian-vector product.

    Every rank draws the same probe, so the ranks' averaged estimates stay one estimate.
    """

    same_draws_on_every_rank = True

    def estimate(self, micro_batches: Sequence[Batch], generator: torch.Generator) -> None:
        x, y = micro_batches[0]
        x, y = x[:self.rows], y[:self.rows]  # one micro-batch at most: double backward

        def closure() -> Tensor:
            with self.autocast():
                return lm_loss(self.model(x), y)

        self.optimizer.update_hessian(closure, generator=generator)  # type: ignore[attr-defined]
