"""Learning-rate schedules: ``lr(step)`` as a pure function of the settings (nanoGPT's get_lr).

The loop sets every parameter group's lr from :meth:`LRSchedule.lr` before each step, so a
checkpoint holds no scheduler state: a resumed run derives its lr from its step and its
settings, and changing a setting on resume changes the lr in a way :meth:`LRSchedule.lr`
states (the trainer reports it).

- ``cosine`` (:func:`warmup_cosine`, GPT-2/nanoGPT): linear warmup, then half a cosine from
  ``lr`` to ``min_lr`` at ``max_steps``. Its whole shape depends on ``max_steps``: resuming
  with a larger one re-stretches it, so the lr jumps up at the resume step.
- ``wsd`` (:func:`warmup_stable_decay`, warmup-stable-decay): linear warmup, ``lr`` held
  constant, then a linear decay to ``min_lr`` over the last ``decay_fraction`` of
  ``max_steps``. Before the decay the lr does not depend on ``max_steps``, so a run resumed
  from a checkpoint in its stable phase (``stable.pt``) with a larger ``max_steps``
  continues without a jump.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.optim import Optimizer

from .errors import SophiaError

if TYPE_CHECKING:
    from .config import Config

__all__ = ["LRSchedule", "warmup_cosine", "warmup_stable_decay"]


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


def decay_start(*, warmup_steps: int, max_steps: int, decay_fraction: float) -> int:
    """The first step of a warmup-stable-decay schedule's decay: ``max_steps`` less
    ``round(decay_fraction * max_steps)`` (at least one step), never inside the warmup."""
    decay_steps = max(1, round(decay_fraction * max_steps))
    return max(warmup_steps, max_steps - decay_steps)


def warmup_stable_decay(step: int, *, lr: float, min_lr: float, warmup_steps: int,
                        max_steps: int, decay_fraction: float) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a warmup-stable-decay run.

    Rises linearly to ``lr`` over ``warmup_steps`` (as :func:`warmup_cosine`), stays at ``lr``
    until :func:`decay_start`, then falls linearly to ``min_lr`` at ``max_steps``; stays at
    ``min_lr`` afterwards.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    start = decay_start(warmup_steps=warmup_steps, max_steps=max_steps,
                        decay_fraction=decay_fraction)
    if step < start:
        return lr
    return lr - (lr - min_lr) * (step - start) / (max_steps - start)


@dataclass(frozen=True)
class LRSchedule:
    """A run's schedule, for parameter groups of any base lr.

    Each group keeps its ratio to its base lr (the lr it was built with; Muon's AdamW part
    has its own), and its floor is ``min_lr_ratio`` times its base lr.

    Attributes:
        kind: ``cosine`` or ``wsd``.
        min_lr_ratio: ``min_lr / lr`` (1 when lr is 0).
        warmup_steps, max_steps: steps; decay_fraction: wsd's share of ``max_steps``.
    """

    kind: str
    min_lr_ratio: float
    warmup_steps: int
    max_steps: int
    decay_fraction: float

    @classmethod
    def from_config(cls, config: Config) -> LRSchedule:
        settings = config.optimizer
        ratio = settings.min_lr / settings.lr if settings.lr else 1.0  # type: ignore[operator]
        return cls(settings.schedule, ratio, settings.warmup_steps, config.run.max_steps,
                   settings.decay_fraction)

    def lr(self, step: int, base_lr: float) -> float:
        """The lr at optimizer step ``step`` (0-based) of a group built with ``base_lr``."""
        min_lr = base_lr * self.min_lr_ratio
        if self.kind == "wsd":
            return warmup_stable_decay(step, lr=base_lr, min_lr=min_lr,
                                       warmup_steps=self.warmup_steps, max_steps=self.max_steps,
                                       decay_fraction=self.decay_fraction)
        return warmup_cosine(step, lr=base_lr, min_lr=min_lr, warmup_steps=self.warmup_steps,
                             max_steps=self.max_steps)

    def apply(self, optimizer: Optimizer, step: int, base_lrs: Sequence[float]) -> None:
        """Set each group's lr for step ``step``; ``base_lrs``: the groups' built lrs."""
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = self.lr(step, base)

    def check(self) -> None:
        """Refuse a wsd decay that trains no step at a decayed lr.

        The decay's first step still trains at the peak (the lr falls linearly to reach
        ``min_lr`` at ``max_steps``, after the last step), so a decay of one step, or none
        (a warmup reaching into it), would end the run at its peak lr with nothing to say so.

        Raises:
            SophiaError: naming the flag to change and its smallest working value.
        """
        start = self.decay_start()
        if start is None or self.max_steps - start >= 2:
            return
        settings = (f"--schedule wsd with --max-steps {self.max_steps}, --decay-fraction "
                    f"{self.decay_fraction:g} and --warmup-steps {self.warmup_steps} decays "
                    f"over {self.max_steps - start} step(s), trained at the peak lr: no step "
                    "trains at a decayed lr")
        if self.max_steps < 2:
            fix = "give --max-steps 2 or more, or --schedule cosine"
        elif self.warmup_steps > self.max_steps - 2:
            fix = f"give --warmup-steps {self.max_steps - 2} or less"
        else:  # round(fraction * max_steps) >= 2 from 2 / max_steps up
            fix = f"give --decay-fraction {math.ceil(2e3 / self.max_steps) / 1e3:g} or more"
        raise SophiaError(f"{settings}; {fix}")

    def decay_start(self) -> int | None:
        """The step a wsd schedule starts its decay (None for cosine)."""
        if self.kind != "wsd":
            return None
        return decay_start(warmup_steps=self.warmup_steps, max_steps=self.max_steps,
                           decay_fraction=self.decay_fraction)
