"""Argument checks of the optimizers: hyperparameters, fused-path parameters, and the scale
and estimates of a Hessian refresh. Each raises a "problem; fix" error and changes nothing."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_fused_param", "check_number", "check_representable", "check_scale",
           "finite_and_valid", "validate_hyperparameters"]

# parameter dtypes the fused CPU kernel steps (complex as real pairs; m, h float32 for bf16/fp16)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
                 torch.complex128)


def check_number(name: str, value: Any, *, low: float = 0.0, high: float | None = None) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            short = name.split(" (")[-1].rstrip(")")  # "learning rate (lr)" -> "lr"
            raise ValueError(f"Invalid {name}: Tensor {short} must be 1-element, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: expected a number, got {value!r}")
    if not math.isfinite(value) or not value >= low or (high is not None and not value < high):
        bounds = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"Invalid {name}: {value!r}; it must be {bounds}")


def check_fused_param(param: Tensor) -> None:
    """Refuse, as torch's fused optimizers do, a parameter that ``fused=True`` cannot step."""
    if param.device.type != "cpu" or param.dtype not in _FUSED_DTYPES or param.is_sparse:
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of supported "
            f"devices: ['cpu'] but {param.dtype} and {param.device.type} (the fused kernel of "
            "sophia_pytorch is CPU-only). Pass fused=None to use it where it can run and the "
            "foreach or for-loop path elsewhere"
        )


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first invalid hyperparameter of a group (or the defaults)."""
    check_number("learning rate (lr)", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    check_number("beta1 (betas[0])", betas[0], high=1.0)
    check_number("beta2 (betas[1])", betas[1], high=1.0)
    check_number("rho", group["rho"])
    check_number("weight_decay", group["weight_decay"])
    check_number("eps", group["eps"])
    if not group["eps"] > 0:  # eps = 0 makes 0/0 = NaN where m = 0 and h <= 0
        raise ValueError(f"Invalid eps: {group['eps']!r}; it must be > 0 (default 1e-15)")
    refresh_every = group["refresh_every"]
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"Invalid refresh_every: {refresh_every!r}; it must be an int >= 1")
    for flag in ("bias_correction", "refresh_at_start"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}: {group[flag]!r}; expected True or False")
    band = group["unclipped_band"]
    if band is not None:
        if not isinstance(band, (tuple, list)) or len(band) != 2:
            raise ValueError(f"Invalid unclipped_band: {band!r}; expected None or a pair "
                             "(low, high) of fractions, e.g. (0.1, 0.5)")
        check_number("unclipped_band[0]", band[0], high=1.0)
        check_number("unclipped_band[1]", band[1], high=1.0 + 1e-12)
        if not band[0] < band[1]:
            raise ValueError(f"Invalid unclipped_band: {band!r}; low must be < high")


def check_scale(name: str, value: float | Tensor, *, positive: bool) -> None:
    """Refuse a ``scale`` (>= 0) or ``grad_scale`` (> 0) that is not a finite number or a
    one-element tensor; a tensor's value is checked later, in the one host read of the fold."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a Tensor {name} must have one element, got "
                             f"shape {tuple(value.shape)}")
        return
    check_number(name, value)
    if positive and not value > 0:
        raise ValueError(f"Invalid {name}: {value!r}; it must be > 0 (the loss scale the "
                         "gradients carry, e.g. scaler.get_scale())")


def check_representable(coefficient: float | Tensor, weight: float, dtype: torch.dtype,
                         scale: float | Tensor, grad_scale: float | Tensor | None) -> None:
    """Refuse a number coefficient of ĥ whose product with the EMA weight overflows ``dtype``
    (a Tensor one is on the device: it is not read)."""
    if isinstance(coefficient, Tensor):
        return
    value = coefficient * weight
    if not (math.isfinite(value) and abs(value) <= torch.finfo(dtype).max):
        raise ValueError(
            f"Invalid scale: scale={scale!r} with grad_scale={grad_scale!r} gives the estimate "
            f"a factor {coefficient!r}, which overflows the {dtype} Hessian state; scale is "
            "the sample count B and grad_scale the loss scale"
        )


def finite_and_valid(estimates: list[Tensor], scale: float | Tensor | None,
                      grad_scale: float | Tensor) -> bool:
    """Whether every estimate is finite, reading the device once for all; a Tensor ``scale``
    (< 0 or not finite) or ``grad_scale`` (<= 0 or not finite) found invalid in that same read
    raises ValueError."""
    checks: list[tuple[str, Tensor]] = []
    if isinstance(scale, Tensor):
        checks.append(("scale", scale.isfinite() & (scale >= 0)))
    if isinstance(grad_scale, Tensor):
        checks.append(("grad_scale", grad_scale.isfinite() & (grad_scale > 0)))
    flags = [e.isfinite().all() for e in estimates] + [f.reshape(()) for _, f in checks]
    if not flags:
        return True
    read = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    for (name, _), ok in zip(checks, read[len(estimates):]):
        if not ok:
            value = scale if name == "scale" else grad_scale
            raise ValueError(f"Invalid {name}: {value!r}; it must be finite and "
                             f"{'>= 0' if name == 'scale' else '> 0'}")
    return all(read[:len(estimates)])
