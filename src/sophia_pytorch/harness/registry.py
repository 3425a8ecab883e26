"""The optimizers the harness runs: one table, :data:`OPTIMIZERS` (name -> :class:`OptimizerSpec`).

A spec says everything the rest of the harness asks about an optimizer: how to build it,
which preset row gives its unset hyperparameters, which Hessian refresh feeds it, whether it
runs under FSDP2, and which constructor ``sophia_options`` go to. Adding an optimizer is one
builder function and one row here (plus its rows in the presets, ``config.PRESETS``); nothing
else asks "which optimizer is this?".

A *variant* is a spec whose ``extra`` keywords change its constructor's defaults (the row and
``sophia_options`` win); ``sophiag-official`` is one, with a row of its own that carries the
authors' hyperparameters (``config._official_row``), so it trains as the authors' SophiaG.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import sophia_pytorch

from .baselines.lion import Lion
from .baselines.muon import MuonWithAdamW, MuonWithSophiaG, hidden_matrices
from .hessian import GaussNewtonBartlett, HessianRefresh, Hutchinson
from .presets import OptimizerHparams


@dataclass(frozen=True)
class OptimizerSettings:
    """What a builder reads: the resolved hyperparameters of ``config.OptimizerSettings`` (every
    row field filled in; ``optimizers.build_optimizer`` makes one from it)."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    rho: float
    refresh_every: int
    sophia_options: Mapping[str, Any]
    state_dtype: str = "float32"  # Sophia's m and h: "float32", "bfloat16" or "uint8"

__all__ = ["OPTIMIZERS", "RESERVED_OPTIONS", "OptimizerSettings", "OptimizerSpec", "decay_groups"]

# Keywords the harness sets from its own settings, not from sophia_options: where to set them.
RESERVED_OPTIONS = {"params": "the model's parameters", "lr": "--lr", "betas": "--beta1/--beta2",
                    "weight_decay": "--weight-decay", "rho": "--rho",
                    "refresh_every": "--refresh-every", "state_dtype": "--state-dtype"}
# the harness's --state-dtype -> Sophia's state_dtype keyword
_STATE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "uint8": torch.uint8}

# build(settings, model, rows, device): ``rows`` are the preset's hyperparameter rows by name.
Builder = Callable[[OptimizerSettings, nn.Module, Mapping[str, OptimizerHparams],
                    "torch.device | None"], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """How the harness builds and drives one optimizer.

    Attributes:
        build: ``build(settings, model, rows, device)`` -> the optimizer over ``model``'s
            trainable parameters, at ``settings``' resolved hyperparameters (``rows``: the
            preset's rows, for optimizers that read another row, as Muon's AdamW part does).
        row: the preset row its unset hyperparameters come from (its own name, or for a
            variant its base's).
        refresh: the Hessian estimator that feeds it (None: it needs none).
        fsdp_refusal: why it cannot run under ``--parallel fsdp``; None when it can.
        options_class: the constructor ``sophia_options`` go to, checked against its
            signature; None: it takes no ``sophia_options``.
        extra: keywords a variant adds to its constructor (under the row and options).
        description: one line for ``sophia presets`` and the docs.
    """

    build: Builder
    row: str
    refresh: type[HessianRefresh] | None = None
    fsdp_refusal: str | None = None
    options_class: type | None = None
    extra: Callable[[], dict[str, Any]] = field(default=dict)
    description: str = ""

    @property
    def takes_options(self) -> bool:
        """Whether ``sophia_options`` go to this optimizer."""
        return self.options_class is not None

    def unknown_options(self, options: Mapping[str, Any]) -> list[str]:
        """The keys of ``options`` its constructor does not take (all, if it takes none)."""
        if self.options_class is None:
            return sorted(options)
        accepted = inspect.signature(self.options_class).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            return []
        return sorted(key for key in options if key not in accepted)


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: matrices and embeddings decayed, vectors (norms, biases) not."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(settings: OptimizerSettings, model: nn.Module, rows: Mapping[str, OptimizerHparams],
           device: torch.device | None) -> torch.optim.Optimizer:
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(decay_groups(_trainable(model), settings.weight_decay),
                             lr=settings.lr, betas=settings.betas,
                             weight_decay=settings.weight_decay, fused=fused or None)


def _lion(settings: OptimizerSettings, model: nn.Module, rows: Mapping[str, OptimizerHparams],
          device: torch.device | None) -> torch.optim.Optimizer:
    return Lion(decay_groups(_trainable(model), settings.weight_decay), lr=settings.lr,
                betas=settings.betas, weight_decay=settings.weight_decay)


def _muon(settings: OptimizerSettings, model: nn.Module, rows: Mapping[str, OptimizerHparams],
          device: torch.device | None) -> torch.optim.Optimizer:
    """Muon at the config's row on the hidden matrices; AdamW at the preset's adamw row,
    its lr scaled as the config's lr is to Muon's row, on the rest."""
    matrices = hidden_matrices(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in _trainable(model) if id(p) not in chosen]
    adamw, scale = rows["adamw"], settings.lr / rows["muon"].lr
    return MuonWithAdamW(matrices, decay_groups(rest, adamw.weight_decay), lr=settings.lr,
                         momentum=settings.betas[0], weight_decay=settings.weight_decay,
                         adamw_lr=adamw.lr * scale, adamw_betas=adamw.betas,
                         adamw_weight_decay=adamw.weight_decay)


def _muon_part(model: nn.Module, rows: Mapping[str, OptimizerHparams]
               ) -> tuple[torch.optim.Muon, list[nn.Parameter]]:
    """Muon at the preset's ``muon`` row (not scaled by the lr grid) on the hidden matrices,
    and the trainable parameters it leaves to the other part."""
    matrices = hidden_matrices(model)
    chosen = {id(p) for p in matrices}
    row = rows["muon"]
    muon = torch.optim.Muon(matrices, lr=row.lr, momentum=row.betas[0],
                            weight_decay=row.weight_decay)
    return muon, [p for p in _trainable(model) if id(p) not in chosen]


def _muon_adamw(settings: OptimizerSettings, model: nn.Module,
                rows: Mapping[str, OptimizerHparams],
                device: torch.device | None) -> torch.optim.Optimizer:
    """Muon fixed at its row; AdamW at the config's row (the part the lr grid tunes)."""
    muon, rest = _muon_part(model, rows)
    adamw = torch.optim.AdamW(decay_groups(rest, settings.weight_decay), lr=settings.lr,
                              betas=settings.betas, weight_decay=settings.weight_decay)
    return MuonWithAdamW.from_parts(muon, adamw)


def _muon_sophiag(settings: OptimizerSettings, model: nn.Module,
                  rows: Mapping[str, OptimizerHparams],
                  device: torch.device | None) -> torch.optim.Optimizer:
    """Muon fixed at its row; SophiaG at the config's row (the part the lr grid tunes)."""
    muon, rest = _muon_part(model, rows)
    sophia = sophia_pytorch.SophiaG(decay_groups(rest, settings.weight_decay),
                                    **_sophia_keywords(settings))
    return MuonWithSophiaG(muon, sophia)


def _sophia_keywords(settings: OptimizerSettings) -> dict[str, Any]:
    """SophiaG/SophiaH's keywords from the settings: the sophia options, then the harness's
    own (``state_dtype`` only where it is not the constructor's default, float32)."""
    keywords = {**settings.sophia_options, "lr": settings.lr, "betas": settings.betas,
                "weight_decay": settings.weight_decay, "rho": settings.rho,
                "refresh_every": settings.refresh_every}
    if settings.state_dtype != "float32":
        keywords["state_dtype"] = _STATE_DTYPES[settings.state_dtype]
    return keywords


def _sophia(cls: type[torch.optim.Optimizer], extra: Callable[[], dict[str, Any]] = dict
            ) -> Builder:
    def build(settings: OptimizerSettings, model: nn.Module,
              rows: Mapping[str, OptimizerHparams],
              device: torch.device | None) -> torch.optim.Optimizer:
        keywords = {**extra(), **_sophia_keywords(settings)}
        return cls(decay_groups(_trainable(model), settings.weight_decay), **keywords)

    return build


def _official_defaults() -> dict[str, Any]:
    return dict(sophia_pytorch.OFFICIAL_DEFAULTS)


_NO_HVP = ("sophiah cannot run under --parallel fsdp (FSDP2 gathers parameters outside "
           "autograd: no Hessian-vector product); use --parallel ddp, or sophiag")
_WHOLE_MATRICES = ("muon cannot run under --parallel fsdp (it orthogonalises whole matrices, "
                   "FSDP2 holds shards); use --parallel ddp")

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sophiag": OptimizerSpec(_sophia(sophia_pytorch.SophiaG), row="sophiag",
                             refresh=GaussNewtonBartlett, options_class=sophia_pytorch.SophiaG,
                             description="SophiaG, Gauss-Newton-Bartlett Hessian estimate"),
    "sophiah": OptimizerSpec(_sophia(sophia_pytorch.SophiaH), row="sophiah",
                             refresh=Hutchinson, fsdp_refusal=_NO_HVP,
                             options_class=sophia_pytorch.SophiaH,
                             description="SophiaH, Hutchinson Hessian estimate"),
    "adamw": OptimizerSpec(_adamw, row="adamw", description="torch's AdamW (fused on CUDA)"),
    "lion": OptimizerSpec(_lion, row="lion", description="Lion (harness/baselines/lion.py)"),
    "muon": OptimizerSpec(_muon, row="muon", fsdp_refusal=_WHOLE_MATRICES,
                          description="torch's Muon on hidden matrices + AdamW on the rest"),
    "muon-adamw": OptimizerSpec(
        _muon_adamw, row="muon-adamw", fsdp_refusal=_WHOLE_MATRICES,
        description="Muon (its preset row, fixed) on hidden matrices + AdamW on the rest, "
                    "the lr grid tuning the AdamW part"),
    "muon-sophiag": OptimizerSpec(
        _muon_sophiag, row="muon-sophiag", refresh=GaussNewtonBartlett,
        fsdp_refusal=_WHOLE_MATRICES, options_class=sophia_pytorch.SophiaG,
        description="Muon (its preset row, fixed) on hidden matrices + SophiaG on embeddings, "
                    "head and the rest, the lr grid tuning the SophiaG part"),
    "sophiag-official": OptimizerSpec(
        _sophia(sophia_pytorch.SophiaG, _official_defaults), row="sophiag-official",
        refresh=GaussNewtonBartlett, options_class=sophia_pytorch.SophiaG,
        extra=_official_defaults,
        description="SophiaG with the authors' betas, rho and weight decay "
                    "(sophia_pytorch.OFFICIAL_DEFAULTS) at the preset's Sophia-G lr"),
}
