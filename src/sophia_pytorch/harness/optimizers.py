"""The optimizer a config names, and the Hessian refresh that goes with it, built once.

Every optimizer decays the matrices and embeddings (2-D and up) and not the norms and biases.
What each optimizer is — its builder, preset row, refresh, FSDP support, constructor options —
is its row in :data:`.registry.OPTIMIZERS`; :func:`build_optimizer` and :func:`build_refresh`
read it, and the loop then talks to the optimizer and to the
:class:`~.hessian.HessianRefresh` chosen for it, and never asks which optimizer runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .config import PRESETS, Config
from .errors import SophiaError
from .hessian import HessianRefresh, NoRefresh, SophiaRefresh
from .registry import OPTIMIZERS, OptimizerSettings, decay_groups

__all__ = ["build_optimizer", "build_refresh", "decay_groups"]


def build_optimizer(config: Config, model: nn.Module,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer.name`` over ``model``'s trainable parameters.

    AdamW is torch's (fused on CUDA), Lion ours, Muon torch's (with AdamW on what is not a
    hidden matrix, see ``baselines.muon``), SophiaG/SophiaH the library's; all take the
    config's lr, betas and weight decay, Sophia also ``rho``, ``refresh_every`` and the
    ``sophia_options`` keywords (checked against its signature when the config is made),
    over a variant's extra keywords (``registry.OPTIMIZERS``).

    Raises:
        SophiaError: a value the optimizer's constructor refuses.
    """
    spec, resolved = OPTIMIZERS[config.optimizer.name], config.optimizer
    assert resolved.lr is not None and resolved.weight_decay is not None \
        and resolved.rho is not None, "config.resolve fills every row field"
    settings = OptimizerSettings(
        lr=resolved.lr, betas=resolved.betas, weight_decay=resolved.weight_decay,
        rho=resolved.rho, refresh_every=resolved.refresh_every,
        sophia_options=resolved.sophia_options, state_dtype=resolved.state_dtype)
    try:
        return spec.build(settings, model, PRESETS[config.preset].optimizers, device)
    except ValueError as exc:
        raise SophiaError(f"{config.optimizer.name} refused its settings: {exc}; fix that "
                          "setting") from None


def build_refresh(config: Config, optimizer: torch.optim.Optimizer, model: nn.Module, *,
                  autocast: Callable[[], contextlib.AbstractContextManager],
                  device: torch.device, rank: int = 0, world_size: int = 1) -> HessianRefresh:
    """The refresh ``optimizer`` needs, over ``model`` (the module the loop calls).

    Sophia estimates on ``refresh_fraction`` of the step's rows (at least one).
    """
    refresh = OPTIMIZERS[config.optimizer.name].refresh
    if refresh is None:
        return NoRefresh()
    assert issubclass(refresh, SophiaRefresh), refresh  # the registry's refreshes are Sophia's
    run = config.run
    rows = max(1, round(config.optimizer.refresh_fraction * run.batch_size * run.grad_accum))
    return refresh(optimizer, model, rows=rows, autocast=autocast,
                   seed=run.seed, rank=rank, world_size=world_size, device=device)
