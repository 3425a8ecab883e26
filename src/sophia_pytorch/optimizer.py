"""SophiaG and SophiaH: the Sophia update with a Gauss-Newton-Bartlett or Hutchinson Hessian.

The classes own parameter groups and state; the maths is in ``sophia_pytorch.functional``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._dtensor import all_reduce_mean, is_dtensor, local_shards, sum_over_shards
from ._kernel.loader import unavailable_reason as fused_kernel_unavailable_reason
from ._kernel.loader import warn_unavailable_once as warn_fused_kernel_unavailable
from .estimators import _hutchinson_estimate
from .functional import (
    fused_kernel_available,
    gauss_newton_ema_update,
    hessian_ema_update,
    sophia_update,
    unclipped_count,
)

__all__ = ["SophiaG", "SophiaH"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STATE_KEYS = ("exp_avg", "hessian")


def _check_number(name: str, value: Any, *, low: float = 0.0, high: float | None = None) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a Tensor {name} must have one element, got {value}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: expected a number, got {value!r}")
    if not value >= low or (high is not None and not value < high):
        bounds = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"Invalid {name}: {value!r}; it must be {bounds}")


def _validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first invalid hyperparameter of a group (or the defaults)."""
    _check_number("learning rate (lr)", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    _check_number("beta1 (betas[0])", betas[0], high=1.0)
    _check_number("beta2 (betas[1])", betas[1], high=1.0)
    _check_number("rho", group["rho"])
    _check_number("weight_decay", group["weight_decay"])
    _check_number("eps", group["eps"])
    if not group["eps"] > 0:  # eps = 0 makes 0/0 = NaN where m = 0 and h <= 0
        raise ValueError(f"Invalid eps: {group['eps']!r}; it must be > 0 (default 1e-15)")
    refresh_every = group["refresh_every"]
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"Invalid refresh_every: {refresh_every!r}; it must be an int >= 1")


class _Sophia(Optimizer):
    """Shared plumbing of SophiaG and SophiaH: validation, state, step, diagnostics."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        refresh_every: int = 10,
    ) -> None:
        _validate_hyperparameters(
            dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
                 refresh_every=refresh_every)
        )
        if not isinstance(maximize, bool):
            raise ValueError(f"Invalid maximize: {maximize!r}; expected True or False")
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"Invalid foreach: {foreach!r}; expected True, False or None")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"Invalid fused: {fused!r}; expected True, False or None")
        if fused and foreach:
            raise ValueError("fused=True and foreach=True cannot be asked for together")
        if fused and not fused_kernel_available():
            reason = fused_kernel_unavailable_reason()
            raise RuntimeError(f"fused=True, but the fused kernel is unavailable: {reason}")
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
            maximize=maximize, foreach=foreach, fused=fused, refresh_every=refresh_every,
        )
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(_Sophia._remember_state_dtypes)
        self.register_load_state_dict_post_hook(_Sophia._restore_state_dtypes)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as torch.optim does, after checking its own hyperparameters."""
        super().add_param_group(param_group)
        try:
            _validate_hyperparameters(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("eps", 1e-15)
            group.setdefault("refresh_every", 10)
        for param_state in self.state.values():
            step = param_state.get("step")
            if step is not None and not torch.is_tensor(step):
                param_state["step"] = torch.tensor(float(step), dtype=torch.float32)

    # ----------------------------------------------------------------------------- state
    def _state_for(self, param: Tensor) -> dict[str, Tensor]:
        """The state of ``param``, created on first use: m and h are zeros, step a 0-dim tensor.

        m and h are float32 for float16/bfloat16 parameters (they hold small, slowly moving
        averages that bf16's 8-bit mantissa would round away), else the parameter's dtype.
        """
        state = self.state[param]
        if len(state) == 0:
            dtype = torch.float32 if param.dtype in _LOW_PRECISION else param.dtype
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in _STATE_KEYS:
                state[key] = torch.zeros_like(
                    param, dtype=dtype, memory_format=torch.preserve_format
                )
        return state

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        hessians: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self._state_for(param)
            # FSDP2 (DTensor) parameters: update the local shards; see sophia_pytorch._dtensor.
            param, grad, exp_avg, hessian = local_shards(
                param, param.grad, state["exp_avg"], state["hessian"]
            )
            params.append(param)
            grads.append(grad)
            exp_avgs.append(exp_avg)
            hessians.append(hessian)
            steps.append(state["step"])

    def _use_foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if group["foreach"] is not None:
            return group["foreach"]
        if torch.compiler.is_compiling():
            return False
        return bool(params) and all(p.device.type in ("cuda", "xpu", "mps") for p in params)

    def _use_fused(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """The one-pass CPU kernel: when asked for, and by default where it applies.

        It is bitwise equal to the for-loop, so the default (fused and foreach both None, as in
        torch) takes it for CPU parameters unless the lr is a Tensor or the step is compiled.
        """
        if torch.compiler.is_compiling():
            return False
        if group["fused"] is not None:
            return group["fused"]
        if group["foreach"] is not None or isinstance(group["lr"], Tensor):
            return False
        if not any(p.device.type == "cpu" for p in params):
            return False
        if fused_kernel_available():
            return True
        warn_fused_kernel_unavailable()
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one update of every parameter that has a gradient.

        Args:
            closure: optional; re-evaluates the model, calls backward and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, hessians, steps = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, hessians, steps)
            if not params:
                continue
            if torch.compiler.is_compiling():
                for step in steps:
                    step += 1
            else:
                torch._foreach_add_(steps, 1)
            sophia_update(
                params, grads, exp_avgs, hessians,
                lr=group["lr"], beta1=group["betas"][0], rho=group["rho"],
                weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"], foreach=self._use_foreach(group, params),
                fused=self._use_fused(group, params),
            )
        return loss

    # ---------------------------------------------------------------------- diagnostics
    def steps_taken(self) -> int:
        """The largest per-parameter step count: how many times ``step()`` updated a parameter."""
        counts = [int(s["step"]) for s in self.state.values() if "step" in s]
        return max(counts, default=0)

    def hessian_due(self) -> bool:
        """True right after a ``step()`` whose count is a multiple of ``refresh_every``.

        Call it after ``step()``; when True, refresh the Hessian (``update_hessian``) before
        the next one. With ``refresh_every=10`` this refreshes after steps 10, 20, ….
        The interval is the first parameter group's: the refresh is one backward for all.
        """
        taken = self.steps_taken()
        return taken > 0 and taken % self.param_groups[0]["refresh_every"] == 0

    @torch.no_grad()
    def unclipped_fraction(self) -> float:
        """Fraction of coordinates with ``|m| < ρ·h``: those the clip leaves alone.

        The official code logs it as "win rate". 0.0 before
        any state exists or when every coordinate is clipped (a pure sign step). Counted over
        whole parameters: with FSDP2 (DTensor) parameters this is a collective, to be called
        on every rank.
        """
        states, counts, sizes = [], [], []
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state or "exp_avg" not in state:
                    continue
                exp_avg, hessian = local_shards(state["exp_avg"], state["hessian"])
                count, size = unclipped_count(exp_avg, hessian, group["rho"])
                states.append(state["exp_avg"])
                counts.append(count)
                sizes.append(size)
        if counts:  # one device-to-host read for all parameters, not one each
            counts = torch.stack([c.to(counts[0].device) for c in counts]).tolist()
        unclipped, total = sum_over_shards(zip(states, counts, sizes))
        return unclipped / total if total else 0.0

    # --------------------------------------------------------- state_dict dtype handling
    # torch casts every loaded floating-point state tensor to its parameter's dtype. That
    # would round the float32 m and h of bf16 parameters to bf16; these hooks undo it by
    # keeping the saved tensors and putting them back with their own dtype.
    @staticmethod
    def _remember_state_dtypes(optimizer: _Sophia, state_dict: dict[str, Any]) -> None:
        saved: dict[int, dict[str, Tensor]] = {}
        for param_id, param_state in state_dict["state"].items():
            saved[param_id] = {k: v for k, v in param_state.items() if k in _STATE_KEYS}
        optimizer._saved_state_for_load = (saved, [g["params"] for g in state_dict["param_groups"]])

    @staticmethod
    def _restore_state_dtypes(optimizer: _Sophia) -> None:
        saved, saved_ids = optimizer.__dict__.pop("_saved_state_for_load", ({}, []))
        for ids, group in zip(saved_ids, optimizer.param_groups):
            for param_id, param in zip(ids, group["params"]):
                for key, value in saved.get(param_id, {}).items():
                    state = optimizer.state[param]
                    if param.dtype in _LOW_PRECISION and isinstance(value, Tensor):
                        state[key] = value.to(device=param.device, dtype=torch.float32, copy=True)


class SophiaG(_Sophia):
    r"""Sophia with the Gauss-Newton-Bartlett Hessian estimate, for softmax/cross-entropy models.

    Every ``step()``::

        θ ← θ·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  θ ← θ − lr·clamp(m / max(ρ·h, ε), −1, 1)

    Every ``refresh_every`` steps, the user back-propagates the sampled-label loss of
    :func:`sophia_pytorch.sampled_cross_entropy` and calls ``update_hessian(scale=B)``, which folds
    ĥ = B·g⊙g into h: ``h ← β2·h + (1 − β2)·ĥ``. No bias correction; m and h start at zero.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default 1e-4); a float or a 0-dim tensor.
        betas: (β1, β2), EMA coefficients of m and h (default (0.965, 0.99)).
        rho: γ, the clipping scale of h against |m| (default 0.04).
        weight_decay: decoupled weight decay (default 0.1).
        eps: floor of the denominator ρh (default 1e-15).
        maximize: maximise the objective instead of minimising it (default False).
        foreach: use the multi-tensor path; None picks it on accelerators (default None).
        fused: use the one-pass CPU kernel of :mod:`sophia_pytorch._kernel`, bitwise equal to the
            for-loop; None takes it for CPU parameters when it can be built, else falls back
            with one warning; True raises if it cannot be built (default None).
        refresh_every: k, the Hessian refresh interval used by ``hessian_due()`` (default 10).

    Migrating from the official ``SophiaG``: where it called ``update_hessian()`` and
    ``step(bs=bs)``, call ``update_hessian(scale=bs)`` and ``step()``; the trajectories agree.
    """

    @torch.no_grad()
    def update_hessian(self, scale: float = 1.0) -> None:
        """Fold ĥ = ``scale``·p.grad⊙p.grad into h for every parameter with a gradient.

        Args:
            scale: B, the number of samples in the mean sampled-label loss whose gradient
                is in ``p.grad`` — counted over all data-parallel ranks (default 1.0).
        """
        _check_number("scale", scale)
        for group in self.param_groups:
            hessians, grads = [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state_for(param)
                _, hessian, grad = local_shards(param, state["hessian"], param.grad)
                hessians.append(hessian)
                grads.append(grad)
            gauss_newton_ema_update(
                hessians, grads, beta2=group["betas"][1], scale=float(scale),
                foreach=self._use_foreach(group, hessians),
            )


class SophiaH(_Sophia):
    r"""Sophia with the Hutchinson Hessian estimate, for any twice-differentiable loss.

    The step is SophiaG's. ``update_hessian(closure)`` re-evaluates the loss, draws u with
    i.i.d. ±1 entries, computes ĥ = u⊙(∇²L·u) with one Hessian-vector product (a double
    backward, on refresh steps only) and folds it in: ``h ← β2·h + (1 − β2)·ĥ``. Under an
    initialised ``torch.distributed`` process group ĥ is averaged across ranks, since a
    double backward bypasses DistributedDataParallel's gradient all-reduce.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default 1e-4).
        betas: (β1, β2) (default (0.965, 0.99)).
        rho: γ (default 0.04). Our choice, not the paper's tuning: the same as SophiaG,
            since both estimators target the diagonal of the mean loss's curvature.
        weight_decay: decoupled weight decay (default 0.1).
        eps: floor of ρh (default 1e-15). A negative ĥ can make h negative; the floor turns
            such a coordinate's update into a full sign step, never a reversed one.
        maximize, foreach, fused, refresh_every: as in :class:`SophiaG`.
    """

    def update_hessian(
        self,
        closure: Callable[[], Tensor],
        *,
        generator: torch.Generator | None = None,
        math_attention: bool = True,
    ) -> Tensor:
        """Draw a Hutchinson estimate of the Hessian diagonal and fold it into h.

        Args:
            closure: recomputes and returns the scalar loss; must not call backward.
            generator: random source of the probes (default: torch's global generator).
                Use the same seed on every rank for identical probes under data parallel.
            math_attention: evaluate the closure under the math attention backend, which
                has the double backward that fused attention kernels lack (default True).

        Returns:
            the loss the closure returned, detached.
        """
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if any(is_dtensor(p) for p in params):
            raise NotImplementedError(
                "SophiaH does not support DTensor parameters (FSDP2 `fully_shard`): FSDP2 "
                "all-gathers them outside autograd, so no Hessian-vector product reaches the "
                "shards. Use DistributedDataParallel, or SophiaG, for data-parallel SophiaH."
            )
        loss_holder: list[Tensor] = []

        def recording_closure() -> Tensor:
            loss = closure()
            loss_holder.append(loss)
            return loss

        estimates = _hutchinson_estimate(
            recording_closure, params, generator=generator, math_attention=math_attention
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            all_reduce_mean([e for e in estimates if e is not None])
        estimate_of = {p: e for p, e in zip(params, estimates) if e is not None}
        with torch.no_grad():
            for group in self.param_groups:
                members = [p for p in group["params"] if p in estimate_of]
                hessian_ema_update(
                    [self._state_for(p)["hessian"] for p in members],
                    [estimate_of[p] for p in members],
                    beta2=group["betas"][1],
                    foreach=self._use_foreach(group, members),
                )
        return loss_holder[0].detach()
