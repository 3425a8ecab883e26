"""The optimizer a config names, and the Hessian refresh that goes with it, built once.

Every optimizer decays the matrices and embeddings (2-D and up) and not the norms and biases.
:func:`build_optimizer` is the one place that asks which optimizer runs; the loop then talks
to the optimizer and to the :class:`~.refresh.HessianRefresh` that :func:`build_refresh`
chose for it, and never asks again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .baselines.lion import Lion
from .config import Config
from .refresh import GaussNewtonBartlett, HessianRefresh, Hutchinson

__all__ = ["build_optimizer", "build_refresh", "decay_groups"]

# Which estimator feeds each optimizer's Hessian; absent: none (AdamW, Lion).
_REFRESH: dict[str, type[HessianRefresh]] = {"sophiag": GaussNewtonBartlett,
                                             "sophiah": Hutchinson}


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: matrices and embeddings decayed, vectors (norms, biases) not."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(config: Config, model: nn.Module,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over ``model``'s trainable parameters.

    AdamW is torch's (fused on CUDA), Lion ours, SophiaG/SophiaH the library's; all take the
    config's lr, betas and weight decay, Sophia also ``rho`` and ``refresh_every``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = decay_groups(params, config.weight_decay)  # type: ignore[arg-type]
    kwargs = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        fused = device is not None and device.type == "cuda"
        return torch.optim.AdamW(groups, **kwargs, fused=fused or None)
    if config.optimizer == "lion":
        return Lion(groups, **kwargs)
    import sophia_pytorch

    cls = {"sophiag": sophia_pytorch.SophiaG, "sophiah": sophia_pytorch.SophiaH}[config.optimizer]
    return cls(groups, **kwargs, rho=config.rho, refresh_every=config.hessian_every)


def build_refresh(config: Config, optimizer: torch.optim.Optimizer, model: nn.Module, *,
                  autocast: Callable[[], contextlib.AbstractContextManager],
                  device: torch.device, rank: int = 0, world_size: int = 1) -> HessianRefresh:
    """The refresh ``optimizer`` needs, over ``model`` (the module the loop calls).

    Sophia estimates on ``hessian_fraction`` of the step's rows (at least one).
    """
    refresh = _REFRESH.get(config.optimizer)
    if refresh is None:
        return HessianRefresh()
    rows = max(1, round(config.hessian_fraction * config.batch_size * config.grad_accum))
    return refresh(optimizer, model, rows=rows, autocast=autocast,  # type: ignore[call-arg]
                   seed=config.seed, rank=rank, world_size=world_size, device=device)
