"""Learning-rate schedule: linear warmup, then cosine decay to a floor (as in GPT-2/nanoGPT)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosine", "warmup_cosine"]


def warmup_cosine(step: int, *, lr: float, min_lr: float, warmup_steps: int,
                  max_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    Rises linearly from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps`` steps,
    then follows half a cosine from ``lr`` down to ``min_lr`` at ``max_steps``; stays at
    ``min_lr`` afterwards.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class WarmupCosine(LRScheduler):
    """:func:`warmup_cosine` as a torch scheduler; call ``step()`` after each optimizer step.

    Each parameter group keeps its ratio to the first group's base lr, and ``min_lr`` is
    given for a base lr of ``lr`` (the floor scales with the group's base lr). The
    ``state_dict`` holds plain numbers, so it loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, optimizer: Optimizer, *, min_lr_ratio: float, warmup_steps: int,
                 max_steps: int, last_epoch: int = -1) -> None:
        self.min_lr_ratio = min_lr_ratio
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            warmup_cosine(self.last_epoch, lr=base, min_lr=base * self.min_lr_ratio,
                          warmup_steps=self.warmup_steps, max_steps=self.max_steps)
            for base in self.base_lrs
        ]
