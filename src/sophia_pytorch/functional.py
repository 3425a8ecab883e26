"""The Sophia update rule as pure functions over lists of tensors.

Per parameter θ with gradient g, gradient EMA m and Hessian-diagonal EMA h::

    θ ← θ · (1 − lr · weight_decay)                 decoupled weight decay
    m ← β1 · m + (1 − β1) · g                        every step, no bias correction
    θ ← θ − lr · clamp(m / max(ρ · h, ε), −1, 1)     = sign(m) · min(|m| / max(ρh, ε), 1)

and, every k steps, with a fresh diagonal estimate ĥ::

    h ← β2 · h + (1 − β2) · ĥ

``max(ρh, ε)`` rather than ``ρh + ε``: a Hutchinson estimate can be negative, and a negative
denominator would flip the update against the momentum. With the max, a coordinate whose
curvature is not positive takes a full sign step, as a clipped coordinate does.

``_single_tensor_sophia`` is the readable ground truth; ``_multi_tensor_sophia`` does the same
with torch's foreach kernels; ``sophia_update`` picks one. The state (``exp_avgs``,
``hessians``) may be float32 for low-precision parameters: the update is then computed in the
state's dtype and rounded once into the parameter. It may also be bfloat16 (``state_dtype`` of
the optimizers): the update is then computed in float32 and m and h are stochastically rounded
back (``sophia_pytorch._rounding``). Or 8-bit: uint8 codes with a float32 absmax per block of
256 (``sophia_pytorch._quantize``; m in the signed dynamic code, h in the unsigned one),
decoded to float32 for the update and stochastically rounded back to codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._kernel import loader as _kernel
from ._quantize import SIGNED, UNSIGNED, DynamicCode, dequantize, quantize_
from ._rounding import stochastic_round_bf16

_ACCELERATORS = ("cuda", "xpu", "mps")
_NARROW = (torch.bfloat16, torch.uint8)  # state dtypes stored narrower than they are computed

__all__ = [
    "sophia_update",
    "hessian_ema_update",
    "gauss_newton_ema_update",
    "unclipped_count",
    "fused_kernel_available",
]


def _as_real(*tensors: Tensor) -> list[Tensor]:
    return [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors]


def _in_dtype(lr: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """A Tensor ``lr`` in the state's precision, so a float32 lr tensor cannot round the
    weight-decay factor of float64 parameters; a float ``lr`` as it is."""
    return lr.to(dtype) if isinstance(lr, Tensor) and lr.dtype != dtype else lr


def _single_tensor_sophia(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    rounding_keys: list[int] | None = None,
    exp_avg_absmaxes: list[Tensor] | None = None,
    hessian_absmaxes: list[Tensor] | None = None,
) -> None:
    for index, (param, grad, exp_avg, hessian) in enumerate(
            zip(params, grads, exp_avgs, hessians)):
        param, grad, exp_avg, hessian = _as_real(param, grad, exp_avg, hessian)
        stored = exp_avg
        if exp_avg.dtype in _NARROW:  # bf16 or 8-bit state: computed in float32, rounded back
            exp_avg = _widen(exp_avg, _absmax(exp_avg_absmaxes, index), SIGNED)
            hessian = _widen(hessian, _absmax(hessian_absmaxes, index), UNSIGNED)
        if maximize:
            grad = -grad
        if weight_decay != 0:
            param.mul_(1 - _in_dtype(lr, exp_avg.dtype) * weight_decay)
        exp_avg.mul_(beta1).add_(grad.to(exp_avg.dtype), alpha=1 - beta1)
        ratio = (exp_avg / (rho * hessian).clamp_(min=eps)).clamp_(-1, 1)
        if isinstance(lr, Tensor):
            param.sub_((ratio * lr).to(param.dtype))
        elif ratio.dtype == param.dtype:
            param.add_(ratio, alpha=-lr)
        else:
            param.add_(ratio.mul_(-lr).to(param.dtype))
        if stored is not exp_avg:
            _store(stored, exp_avg, _key(rounding_keys, index),
                   _absmax(exp_avg_absmaxes, index), SIGNED)


def _key(rounding_keys: list[int] | None, index: int) -> int:
    if rounding_keys is None:
        raise ValueError("bfloat16 and 8-bit state need rounding_keys: one stochastic-rounding "
                         "key per tensor (see sophia_pytorch._rounding.rounding_key)")
    return rounding_keys[index]


def _absmax(absmaxes: list[Tensor] | None, index: int) -> Tensor | None:
    return None if absmaxes is None else absmaxes[index]


def _widen(stored: Tensor, absmax: Tensor | None, code: DynamicCode) -> Tensor:
    """A float32 copy of bf16 or 8-bit state (``absmax``: its block scales) to compute in."""
    if stored.dtype == torch.uint8:
        if absmax is None:
            raise ValueError("8-bit state needs its absmaxes: one float32 tensor of block "
                             "scales per uint8 tensor (see sophia_pytorch._quantize)")
        decoded: Tensor = dequantize(stored, absmax, code)
        return decoded
    return stored.float()


def _store(home: Tensor, value: Tensor, key: int, absmax: Tensor | None,
           code: DynamicCode) -> None:
    """Round float32 ``value`` stochastically into its bf16 or 8-bit ``home``."""
    if home.dtype == torch.uint8:
        assert absmax is not None  # _widen made value and checked it
        quantize_(home, absmax, value, code, key)
    else:
        home.copy_(stochastic_round_bf16(value, key))


def _multi_tensor_sophia(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    rounding_keys: list[int] | None = None,
    exp_avg_absmaxes: list[Tensor] | None = None,
    hessian_absmaxes: list[Tensor] | None = None,
) -> None:
    if not params:
        return
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = {}
    for index, (param, exp_avg) in enumerate(zip(params, exp_avgs)):
        groups.setdefault((param.device, param.dtype, exp_avg.dtype), []).append(index)

    for (_, param_dtype, stored_dtype), indices in groups.items():
        group_params = _as_real(*[params[i] for i in indices])
        group_grads: list[Tensor] | tuple[Tensor, ...] = _as_real(*[grads[i] for i in indices])
        stored_exp_avgs = _as_real(*[exp_avgs[i] for i in indices])
        group_exp_avgs, group_hessians = stored_exp_avgs, _as_real(*[hessians[i]
                                                                     for i in indices])
        state_dtype = stored_dtype
        if stored_dtype in _NARROW:  # bf16 or 8-bit state: computed in float32, rounded back
            state_dtype = torch.float32
            group_exp_avgs = [_widen(m, _absmax(exp_avg_absmaxes, i), SIGNED)
                              for m, i in zip(stored_exp_avgs, indices)]
            group_hessians = [_widen(h, _absmax(hessian_absmaxes, i), UNSIGNED)
                              for h, i in zip(group_hessians, indices)]

        if state_dtype != param_dtype:
            group_grads = [g.to(state_dtype) for g in group_grads]
        if maximize:
            group_grads = torch._foreach_neg(group_grads)
        if weight_decay != 0:
            torch._foreach_mul_(group_params, 1 - _in_dtype(lr, state_dtype) * weight_decay)
        torch._foreach_mul_(group_exp_avgs, beta1)
        torch._foreach_add_(group_exp_avgs, group_grads, alpha=1 - beta1)

        denominators = torch._foreach_mul(group_hessians, rho)
        torch._foreach_clamp_min_(denominators, eps)
        ratios: list[Tensor] | tuple[Tensor, ...] = torch._foreach_div(group_exp_avgs,
                                                                        denominators)
        del denominators
        torch._foreach_clamp_min_(ratios, -1.0)
        torch._foreach_clamp_max_(ratios, 1.0)
        if isinstance(lr, Tensor) or state_dtype != param_dtype:
            torch._foreach_mul_(ratios, -lr)
            if state_dtype != param_dtype:
                ratios = [r.to(param_dtype) for r in ratios]
            torch._foreach_add_(group_params, ratios)
        else:
            torch._foreach_add_(group_params, ratios, alpha=-lr)
        if stored_dtype == torch.bfloat16:
            rounded = [stochastic_round_bf16(m, _key(rounding_keys, i))
                       for m, i in zip(group_exp_avgs, indices)]
            torch._foreach_copy_(stored_exp_avgs, rounded)
        elif stored_dtype == torch.uint8:
            for home, m, i in zip(stored_exp_avgs, group_exp_avgs, indices):
                _store(home, m, _key(rounding_keys, i), _absmax(exp_avg_absmaxes, i), SIGNED)


def sophia_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    rounding_keys: list[int] | None = None,
    exp_avg_absmaxes: list[Tensor] | None = None,
    hessian_absmaxes: list[Tensor] | None = None,
) -> None:
    """One Sophia step, in place, on matching lists of tensors.

    Args:
        params: parameters θ, any shape and floating dtype (complex is viewed as real pairs).
        grads: gradients, same shapes and dtypes as ``params``.
        exp_avgs: m, same shapes; dtype of ``params``, float32 for low-precision params,
            bfloat16, or uint8: 8-bit codes of the signed dynamic code, in blocks of 256
            with ``exp_avg_absmaxes`` (for bfloat16 and uint8 the step is computed in float32
            and m is stochastically rounded back, see ``rounding_keys``).
        hessians: h, same shapes and dtype as ``exp_avgs`` (uint8: the unsigned code).
        lr: step size, a float or a one-element tensor (units of θ per step); the fused
            kernel reads a tensor's value each step (as torch's CPU-fused AdamW takes one).
        beta1: EMA coefficient of m.
        rho: γ in the paper: scales h against |m| before clipping.
        weight_decay: decoupled, multiplied by ``lr``.
        eps: floor of the denominator ρh.
        maximize: ascend instead of descend.
        foreach: use torch's multi-tensor kernels; None: on accelerators (as torch.optim does).
        fused: use the one-pass CPU kernel of :mod:`sophia_pytorch._kernel` (bitwise equal to
            the for-loop) on the tensors it supports; ``foreach`` picks the path for the rest.
            None (with ``foreach`` None too): take it for CPU tensors where it can be built
            (else warn once and fall back), unless ``lr`` is a Tensor or the step is compiled.
        rounding_keys: one 32-bit key per tensor (``sophia_pytorch._rounding.rounding_key``
            of a seed and the step), required where m is bfloat16: m's stochastic rounding
            draws its bits from a hash of the key and the element index, so every path
            rounds alike (default None: no bfloat16 or 8-bit state).
        exp_avg_absmaxes, hessian_absmaxes: where m and h are uint8, one float32 tensor each
            of shape ``(ceil(numel / 256),)``: the blocks' absmax, read and written (see
            :mod:`sophia_pytorch._quantize`). The fused kernel does not step 8-bit state:
            ``fused=True`` with it raises ValueError, None takes the other paths.
    """
    if isinstance(lr, Tensor) and lr.dim() != 0 and lr.numel() == 1:
        lr = lr.reshape(())  # a one-element lr of any shape, as torch's optimizers take it
    if any(m.dtype == torch.uint8 for m in exp_avgs):
        if fused:
            raise ValueError("fused=True, but the fused kernel does not step 8-bit state "
                             "(uint8 m and h); pass fused=False (or None)")
        fused = False
    foreach, fused = _default_paths(params, lr, foreach, fused)
    if fused:
        left = _kernel.fused_sophia_(
            params, grads, exp_avgs, hessians,  # the kernel takes a Tensor lr's value
            lr=float(lr) if isinstance(lr, Tensor) else lr, beta1=beta1, rho=rho,
            weight_decay=weight_decay, eps=eps, maximize=maximize, rounding_keys=rounding_keys,
        )
        if not left:
            return
        params, grads, exp_avgs, hessians = (
            [tensors[i] for i in left] for tensors in (params, grads, exp_avgs, hessians)
        )
        if rounding_keys is not None:
            rounding_keys = [rounding_keys[i] for i in left]
    update = _multi_tensor_sophia if foreach else _single_tensor_sophia
    update(
        params, grads, exp_avgs, hessians,
        lr=lr, beta1=beta1, rho=rho, weight_decay=weight_decay, eps=eps, maximize=maximize,
        rounding_keys=rounding_keys, exp_avg_absmaxes=exp_avg_absmaxes,
        hessian_absmaxes=hessian_absmaxes,
    )


def _default_foreach(tensors: list[Tensor]) -> bool:
    if torch.compiler.is_compiling():
        return False
    return bool(tensors) and all(t.device.type in _ACCELERATORS for t in tensors)


def _default_paths(params: list[Tensor], lr: float | Tensor, foreach: bool | None,
                   fused: bool | None) -> tuple[bool, bool]:
    """The (foreach, fused) pair to run: the caller's choice where given, else the default."""
    if torch.compiler.is_compiling():
        return False, False
    if fused is None:
        fused = False
        if foreach is None and not isinstance(lr, Tensor) \
                and any(p.device.type == "cpu" for p in params):
            fused = fused_kernel_available()
            if not fused:
                _kernel.warn_unavailable_once()
    if foreach is None:
        foreach = _default_foreach(params)
    return foreach, fused


def fused_kernel_available() -> bool:
    """Whether the one-pass CPU kernel can be used here (built or loaded on the first call,
    then checked bitwise against :func:`_single_tensor_sophia` on a probe)."""
    return _kernel.is_available(_single_tensor_sophia)


def hessian_ema_update(
    hessians: list[Tensor],
    estimates: list[Tensor],
    *,
    beta2: float,
    weights: list[float] | None = None,
    foreach: bool | None = None,
    rounding_keys: list[int] | None = None,
    absmaxes: list[Tensor] | None = None,
) -> None:
    """Fold fresh diagonal estimates ĥ into h, in place: ``h ← β2·h + (1 − β2)·ĥ``.

    Args:
        hessians: h, any shapes; ``estimates`` match them in shape (any dtype; cast to h's,
            or to float32 for a bfloat16 h, which is computed in float32 and stochastically
            rounded back).
        beta2: the EMA coefficient.
        weights: optional per-tensor weights w replacing ``1 − β2``: ``h ← (1 − w)·h + w·ĥ``
            (bias correction passes ``(1 − β2) / (1 − β2^r)`` for the r-th estimate).
        foreach: use torch's multi-tensor kernels; None: on accelerators.
        rounding_keys: one key per tensor, required where h is bfloat16 or 8-bit (see
            :func:`sophia_update`).
        absmaxes: where h is uint8 (8-bit codes of the unsigned dynamic code, which holds
            h >= 0 only: a negative h is stored as 0), its blocks' absmax, one float32
            tensor per h (see :func:`sophia_update`).
    """
    stored = _as_real(*hessians)
    hessians = _compute_copies(stored, absmaxes)
    estimates = [e.to(h.dtype) for e, h in zip(_as_real(*estimates), hessians)]
    for decay, weight, indices in _ema_buckets(beta2, weights, len(hessians)):
        group_h, group_e = [hessians[i] for i in indices], [estimates[i] for i in indices]
        if _default_foreach(group_h) if foreach is None else foreach:
            torch._foreach_mul_(group_h, decay)
            torch._foreach_add_(group_h, group_e, alpha=weight)
        else:
            for hessian, estimate in zip(group_h, group_e):
                hessian.mul_(decay).add_(estimate, alpha=weight)
    _round_back(stored, hessians, rounding_keys, absmaxes)


def gauss_newton_ema_update(
    hessians: list[Tensor],
    grads: list[Tensor],
    *,
    beta2: float,
    scale: float | Tensor,
    weights: list[float] | None = None,
    foreach: bool | None = None,
    rounding_keys: list[int] | None = None,
    absmaxes: list[Tensor] | None = None,
) -> None:
    """Fold ĥ = scale · g ⊙ g into h, in place: ``h ← β2·h + (1 − β2)·scale·g⊙g``.

    With ``g`` the gradient of the mean loss on B sampled labels and ``scale = B`` this is
    the Gauss-Newton-Bartlett estimate; it never materialises ĥ.

    Args:
        hessians: h; ``grads`` match them in shape. A bfloat16 or 8-bit h is computed in
            float32 and stochastically rounded back.
        beta2: the EMA coefficient.
        scale: B (a number, or a 0-dim tensor on h's device, read without a host sync).
        weights: per-tensor weights replacing ``1 − β2``, as in :func:`hessian_ema_update`.
        foreach: use torch's multi-tensor kernels; None: on accelerators.
        rounding_keys: one key per tensor, required where h is bfloat16 or 8-bit (see
            :func:`sophia_update`).
        absmaxes: where h is uint8, its blocks' absmax (see :func:`hessian_ema_update`).
    """
    stored = _as_real(*hessians)
    hessians = _compute_copies(stored, absmaxes)
    grads = [g.to(h.dtype) for g, h in zip(_as_real(*grads), hessians)]
    for decay, weight, indices in _ema_buckets(beta2, weights, len(hessians)):
        group_h, group_g = [hessians[i] for i in indices], [grads[i] for i in indices]
        if isinstance(scale, Tensor):  # addcmul's value must be a number: scale g instead
            scaled = [g * (scale.to(g.dtype) * weight) for g in group_g]
            value = 1.0
        else:
            scaled, value = group_g, weight * scale
        if _default_foreach(group_h) if foreach is None else foreach:
            torch._foreach_mul_(group_h, decay)
            torch._foreach_addcmul_(group_h, group_g, scaled, value=value)
        else:
            for hessian, grad, other in zip(group_h, group_g, scaled):
                hessian.mul_(decay).addcmul_(grad, other, value=value)
    _round_back(stored, hessians, rounding_keys, absmaxes)


def _compute_copies(stored: list[Tensor], absmaxes: list[Tensor] | None) -> list[Tensor]:
    """The tensors to compute in: float32 copies of bfloat16 and 8-bit ones (h: the unsigned
    code), the others themselves."""
    return [_widen(t, _absmax(absmaxes, i), UNSIGNED) if t.dtype in _NARROW else t
            for i, t in enumerate(stored)]


def _round_back(stored: list[Tensor], computed: list[Tensor],
                rounding_keys: list[int] | None, absmaxes: list[Tensor] | None) -> None:
    """Round each float32 copy made by ``_compute_copies`` stochastically into its bf16 or
    8-bit home."""
    for index, (home, value) in enumerate(zip(stored, computed)):
        if home is not value:
            _store(home, value, _key(rounding_keys, index), _absmax(absmaxes, index), UNSIGNED)


def _ema_buckets(beta2: float, weights: list[float] | None,
                 count: int) -> list[tuple[float, float, list[int]]]:
    """(decay, weight, tensor indices) triples: one per distinct weight.

    Without ``weights`` the pair is exactly (β2, 1 − β2), as the official code computes it.
    """
    if weights is None:
        return [(beta2, 1 - beta2, list(range(count)))] if count else []
    buckets: dict[float, list[int]] = {}
    for index, weight in enumerate(weights):
        buckets.setdefault(weight, []).append(index)
    return [(beta2 if w == 1 - beta2 else 1 - w, w, ids) for w, ids in buckets.items()]


def unclipped_count(exp_avg: Tensor, hessian: Tensor, rho: float) -> tuple[Tensor, int]:
    """(number of coordinates with |m| < ρ·h, number of coordinates) for one parameter.

    The count is a 0-dim int64 tensor on the state's device, so that a caller summing over
    many parameters reads it back once rather than synchronising per parameter.
    """
    if hessian.dtype == torch.uint8:
        raise TypeError("unclipped_count takes float state; decode 8-bit state first "
                        "(sophia_pytorch._quantize.dequantize)")
    exp_avg, hessian = _as_real(exp_avg, hessian)
    if hessian.dtype == torch.bfloat16:  # ρh in float32, as the step computes it
        exp_avg, hessian = exp_avg.float(), hessian.float()
    return (exp_avg.abs() < rho * hessian).sum(), exp_avg.numel()
