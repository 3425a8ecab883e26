"""The optimizer a config names, and the Hessian refresh that goes with it, built once.

Every optimizer decays the matrices and embeddings (2-D and up) and not the norms and biases.
:func:`build_optimizer` is the one place that asks which optimizer runs; the loop then talks
to the optimizer and to the :class:`~.refresh.HessianRefresh` that :func:`build_refresh`
chose for it, and never asks again.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .baselines.lion import Lion
from .baselines.muon import MuonWithAdamW, hidden_matrices
from .config import PRESETS, VARIANTS, Config, base_optimizer
from .errors import SophiaError
from .refresh import GaussNewtonBartlett, HessianRefresh, Hutchinson

__all__ = ["build_optimizer", "build_refresh", "decay_groups"]

# Which estimator feeds each optimizer's Hessian; absent: none (AdamW, Lion, Muon).
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
    """The optimizer named by ``config.optimizer.name`` over ``model``'s trainable parameters.

    AdamW is torch's (fused on CUDA), Lion ours, Muon torch's (with AdamW on what is not a
    hidden matrix, see ``baselines.muon``), SophiaG/SophiaH the library's; all take the
    config's lr, betas and weight decay, Sophia also ``rho``, ``refresh_every`` and the
    ``sophia_options`` keywords, over a variant's extra keywords (``config.VARIANTS``).

    Raises:
        SophiaError: a Sophia keyword the optimizer does not take, or a value it refuses.
    """
    settings = config.optimizer
    name = base_optimizer(settings.name)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = decay_groups(params, settings.weight_decay)  # type: ignore[arg-type]
    kwargs = dict(lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    if name == "adamw":
        fused = device is not None and device.type == "cuda"
        return torch.optim.AdamW(groups, **kwargs, fused=fused or None)
    if name == "lion":
        return Lion(groups, **kwargs)
    if name == "muon":
        return _muon(config, model, params)
    import sophia_pytorch

    cls = {"sophiag": sophia_pytorch.SophiaG, "sophiah": sophia_pytorch.SophiaH}[name]
    extra = VARIANTS[settings.name][1]() if settings.name in VARIANTS else {}
    keywords = {**extra, **settings.sophia_options, **kwargs, "rho": settings.rho,
                "refresh_every": settings.refresh_every}
    try:
        return cls(groups, **keywords)
    except TypeError as exc:
        unknown = re.search(r"keyword argument '(\w+)'", str(exc))
        if unknown is None:
            raise
        raise SophiaError(
            f"{cls.__name__} takes no keyword {unknown.group(1)!r} (from the sophia options); "
            f"check its name in help(sophia_pytorch.{cls.__name__})"
        ) from None
    except ValueError as exc:
        raise SophiaError(f"{cls.__name__} refused its settings: {exc}; fix that setting") \
            from None


def _muon(config: Config, model: nn.Module, params: list[nn.Parameter]) -> MuonWithAdamW:
    """Muon at the config's row on the hidden matrices; AdamW at the preset's adamw row,
    its lr scaled as the config's lr is to Muon's row, on the rest."""
    settings, rows = config.optimizer, PRESETS[config.preset].optimizers
    matrices = hidden_matrices(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in params if id(p) not in chosen]
    adamw, scale = rows["adamw"], settings.lr / rows["muon"].lr  # type: ignore[operator]
    return MuonWithAdamW(matrices, decay_groups(rest, adamw.weight_decay), lr=settings.lr,
                         momentum=settings.beta1, weight_decay=settings.weight_decay,
                         adamw_lr=adamw.lr * scale, adamw_betas=adamw.betas,
                         adamw_weight_decay=adamw.weight_decay)


def build_refresh(config: Config, optimizer: torch.optim.Optimizer, model: nn.Module, *,
                  autocast: Callable[[], contextlib.AbstractContextManager],
                  device: torch.device, rank: int = 0, world_size: int = 1) -> HessianRefresh:
    """The refresh ``optimizer`` needs, over ``model`` (the module the loop calls).

    Sophia estimates on ``refresh_fraction`` of the step's rows (at least one).
    """
    refresh = _REFRESH.get(base_optimizer(config.optimizer.name))
    if refresh is None:
        return HessianRefresh()
    run = config.run
    rows = max(1, round(config.optimizer.refresh_fraction * run.batch_size * run.grad_accum))
    return refresh(optimizer, model, rows=rows, autocast=autocast,  # type: ignore[call-arg]
                   seed=run.seed, rank=rank, world_size=world_size, device=device)
