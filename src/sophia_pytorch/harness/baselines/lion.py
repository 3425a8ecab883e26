"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"), a harness baseline.

A few lines of our own so the harness needs no extra package; it is a comparison baseline,
not part of the Sophia optimizer core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["Lion"]


class Lion(Optimizer):
    r"""Sign of an interpolated momentum, with decoupled weight decay.

    Every ``step()``::

        θ ← θ·(1 − lr·wd);  θ ← θ − lr·sign(β1·m + (1 − β1)·g);  m ← β2·m + (1 − β2)·g

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 1e-4); typically 3-10x smaller than AdamW's.
        betas: (β1, β2) (default (0.9, 0.99)).
        weight_decay: decoupled weight decay (default 0.0); typically 3-10x AdamW's.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    # torch's stubs type a closure as returning a float; closures return the loss Tensor.
    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @overload
    def step(self, closure: Callable[[], Tensor]) -> Tensor: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float] | None = None) -> Tensor | float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                param.mul_(1.0 - group["lr"] * group["weight_decay"])
                update = exp_avg.lerp(param.grad, 1.0 - beta1).sign_()
                param.add_(update, alpha=-group["lr"])
                exp_avg.lerp_(param.grad, 1.0 - beta2)
        return loss
