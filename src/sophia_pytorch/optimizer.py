"""SophiaG and SophiaH: the Sophia update with a Gauss-Newton-Bartlett or Hutchinson Hessian.

The classes own parameter groups and state; the maths is in ``sophia_pytorch.functional``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import (
    check_fused_param,
    check_number,
    check_representable,
    check_scale,
    finite_and_valid,
    validate_hyperparameters,
)
from ._dtensor import all_reduce_mean, is_dtensor, local_shards, sum_over_shards
from ._kernel.loader import unavailable_reason as fused_kernel_unavailable_reason
from ._rounding import H_STREAM, M_STREAM, rounding_key
from ._state import (
    ABSMAX_KEYS,
    LOW_PRECISION,
    NARROW_STATE,
    check_eight_bit_param,
    computed_dtype,
    decoded,
    load_state_tensor,
    new_state_tensor,
)
from .estimators import _hutchinson_estimate
from .functional import (
    fused_kernel_available,
    gauss_newton_ema_update,
    hessian_ema_update,
    sophia_update,
    unclipped_count,
)

__all__ = ["OFFICIAL_DEFAULTS", "SophiaBase", "SophiaG", "SophiaH"]

_STATE_KEYS = ("exp_avg", "hessian")  # shaped like the parameter
# parameter dtypes that bfloat16 and 8-bit state (state_dtype=torch.bfloat16, torch.uint8) serve
_BF16_STATE_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 0-dim float32 counters on the CPU: steps taken, estimates folded into h, and the step count
# at the last fold (the refresh cadence counts from it).
_COUNT_KEYS = ("step", "hessian_step", "last_refresh_step")
_REQUIRED_KEYS = ("step", "exp_avg", "hessian")  # a loaded state must have these
# ρ moves by this factor, at most _MAX_RHO_MOVES times per refresh, to enter the target band.
_RHO_FACTOR = 2.0 ** 0.5
_MAX_RHO_MOVES = 16

OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, eps=1e-15,
    bias_correction=False, refresh_at_start=False, unclipped_band=None,
)
"""Constructor keywords that make ``SophiaG(params, **OFFICIAL_DEFAULTS)`` the authors' SophiaG
(github.com/Liuhong99/Sophia, PyPI ``sophia-opt``): their defaults, every addition off."""


class SophiaBase(Optimizer):
    """The Sophia step, state and diagnostics that SophiaG and SophiaH share.

    Subclasses add ``update_hessian``, the estimator that feeds h: it gathers one estimate per
    parameter and hands it to ``_fold``, the tail they share (check, fold into h, count, adapt
    ρ), so both return True when the estimate was folded in and False when it was skipped.
    The keywords are those of :class:`SophiaG`, which documents them.
    """

    # set by the load_state_dict pre-hook, popped by the post-hook: (states by id, group ids)
    _saved_state_for_load: tuple[dict[int, dict[str, Tensor]], list[list[int]]]
    # whether every h the estimator makes is >= 0 (8-bit state stores h in an unsigned code)
    _hessian_is_nonnegative = False

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
        bias_correction: bool = False,
        refresh_at_start: bool = False,
        unclipped_band: tuple[float, float] | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if state_dtype not in (None, torch.bfloat16, torch.uint8):
            raise ValueError(f"Invalid state_dtype: {state_dtype!r}; expected None (float32 "
                             "m and h, float64 for float64 parameters), torch.bfloat16 or "
                             "torch.uint8 (8-bit block-wise quantized)")
        if state_dtype == torch.uint8:
            if not self._hessian_is_nonnegative:
                raise ValueError(
                    f"state_dtype=torch.uint8 is not available for {type(self).__name__}: "
                    "8-bit state stores h in an unsigned code, and this estimator's h can be "
                    "negative (Hutchinson's). Use state_dtype=torch.bfloat16, or SophiaG")
            if fused:
                raise ValueError("fused=True with state_dtype=torch.uint8: the fused kernel "
                                 "does not step 8-bit state; pass fused=False (or None)")
        # the optimizer's, not a group's: a loaded state_dict converts to it (see the hooks)
        self.state_dtype: torch.dtype | None = state_dtype
        options = dict(refresh_every=refresh_every, bias_correction=bias_correction,
                       refresh_at_start=refresh_at_start,
                       unclipped_band=tuple(unclipped_band) if isinstance(unclipped_band, list)
                       else unclipped_band)
        validate_hyperparameters(
            dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps, fused=fused,
                 **options)
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
            maximize=maximize, foreach=foreach, fused=fused, **options,
        )
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(SophiaBase._remember_state_dtypes)
        self.register_load_state_dict_post_hook(SophiaBase._restore_state_dtypes)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as torch.optim does, after checking its own hyperparameters.

        Args:
            param_group: ``{"params": ..., **hyperparameters}``; keys it leaves out take the
                optimizer's defaults. An invalid hyperparameter raises ValueError and leaves
                the optimizer's groups as they were.
        """
        super().add_param_group(param_group)
        try:
            validate_hyperparameters(self.param_groups[-1])
            self._check_state_dtype(self.param_groups[-1]["params"])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_state_dtype(self, params: list[Tensor]) -> None:
        """Refuse parameters that bfloat16 or 8-bit state cannot serve (float64, complex;
        for 8-bit, DTensor)."""
        if self.state_dtype not in NARROW_STATE:
            return
        for param in params:
            if param.dtype not in _BF16_STATE_PARAM_DTYPES:
                raise ValueError(
                    f"state_dtype={self.state_dtype} serves float32, bfloat16 and float16 "
                    f"parameters, not {param.dtype}: put such parameters in an optimizer "
                    "with state_dtype=None")
            check_eight_bit_param(param, self.state_dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "state_dtype": self.state_dtype}  # pickle, deepcopy

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("state_dtype", None)  # pickled before state_dtype existed
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("eps", 1e-15)
            group.setdefault("refresh_every", 10)
            group.setdefault("bias_correction", False)
            group.setdefault("refresh_at_start", False)
            group.setdefault("unclipped_band", None)
        for param_state in self.state.values():
            step = param_state.get("step")
            if step is not None and not torch.is_tensor(step):
                param_state["step"] = torch.tensor(float(step), dtype=torch.float32)
        self._infer_last_refresh_steps()

    def _infer_last_refresh_steps(self) -> None:
        """Give states saved before ``last_refresh_step`` existed the step of their last
        refresh under the cadence of then: the r-th refresh came after step r·k, or (r−1)·k
        with ``refresh_at_start``, k the group's ``refresh_every``."""
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state or "last_refresh_step" in state or "step" not in state:
                    continue
                refreshes = int(state.get("hessian_step", 0))
                last = (refreshes - int(group["refresh_at_start"])) * group["refresh_every"]
                last = min(max(last, 0), int(state["step"]))
                state["last_refresh_step"] = torch.tensor(float(last), dtype=torch.float32)

    # ----------------------------------------------------------------------------- state
    def _state_for(self, param: Tensor) -> dict[str, Tensor]:
        """The state of ``param``, created on first use: m and h are zeros; ``step`` (steps
        taken), ``hessian_step`` (estimates folded into h) and ``last_refresh_step``
        (``steps_taken()`` at the last fold) are 0-dim float32 tensors on the CPU.

        m and h are float32 for float16/bfloat16 parameters (they hold small, slowly moving
        averages that bf16's 8-bit mantissa would round to nearest away), else the parameter's
        dtype; bfloat16 with ``state_dtype=torch.bfloat16``, stochastically rounded; with
        ``torch.uint8`` uint8 codes (the parameter's shape) and float32 ``exp_avg_absmax`` and
        ``hessian_absmax`` of shape ``(ceil(numel / 256),)`` (``sophia_pytorch._quantize``).
        """
        state: dict[str, Tensor] = self.state[param]
        if len(state) == 0:
            dtype = self.state_dtype or (torch.float32 if param.dtype in LOW_PRECISION
                                         else param.dtype)
            for key in _COUNT_KEYS:
                state[key] = torch.tensor(0.0, dtype=torch.float32)
            for key in _STATE_KEYS:
                new_state_tensor(state, key, param, dtype)
        return state

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        hessians: list[Tensor],
        steps: list[Tensor],
        seeds: list[int] | None = None,
        first_seed: int = 0,
        absmaxes: tuple[list[Tensor], list[Tensor]] | None = None,
    ) -> None:
        for ordinal, param in enumerate(group["params"], start=first_seed):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            check_eight_bit_param(param, self.state_dtype)
            state = self._state_for(param)
            # FSDP2 (DTensor) parameters: update the local shards; see sophia_pytorch._dtensor.
            param, grad, exp_avg, hessian = local_shards(
                param, param.grad, state["exp_avg"], state["hessian"]
            )
            if group["fused"]:
                check_fused_param(param)
            params.append(param)
            grads.append(grad)
            exp_avgs.append(exp_avg)
            hessians.append(hessian)
            steps.append(state["step"])
            if seeds is not None:
                seeds.append(ordinal)
            if absmaxes is not None:
                absmaxes[0].append(state["exp_avg_absmax"])
                absmaxes[1].append(state["hessian_absmax"])

    # torch's stubs type a closure as returning a float; closures return the loss Tensor.
    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @overload
    def step(self, closure: Callable[[], Tensor]) -> Tensor: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float] | None = None) -> Tensor | float | None:
        """Perform one update of every parameter that has a gradient.

        Args:
            closure: optional; re-evaluates the model, calls backward and returns the loss,
                which ``step`` returns (None without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first_seed = 0
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            hessians: list[Tensor] = []
            steps: list[Tensor] = []
            seeds: list[int] | None = [] if self.state_dtype in NARROW_STATE else None
            absmaxes: tuple[list[Tensor], list[Tensor]] | None = (
                ([], []) if self.state_dtype == torch.uint8 else None)
            self._init_group(group, params, grads, exp_avgs, hessians, steps, seeds, first_seed,
                             absmaxes)
            first_seed += len(group["params"])
            if not params:
                continue
            if isinstance(group["lr"], Tensor):
                check_number("learning rate (lr)", group["lr"])  # one set after construction
            if torch.compiler.is_compiling():
                for step in steps:
                    step += 1
            else:
                torch._foreach_add_(steps, 1)
            keys = None if seeds is None else [
                rounding_key(seed, int(step.item()), M_STREAM) for seed, step in zip(seeds, steps)]
            sophia_update(
                params, grads, exp_avgs, hessians,
                lr=group["lr"], beta1=group["betas"][0], rho=group["rho"],
                weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"], foreach=group["foreach"], fused=group["fused"],
                rounding_keys=keys, exp_avg_absmaxes=None if absmaxes is None else absmaxes[0],
                hessian_absmaxes=None if absmaxes is None else absmaxes[1],
            )
        return loss

    # ------------------------------------------------------------------ Hessian cadence
    def steps_taken(self) -> int:
        """The largest per-parameter step count: how many times ``step()`` updated a parameter."""
        return self._largest_count("step")

    def refreshes_done(self) -> int:
        """The largest per-parameter count of Hessian estimates folded into h."""
        return self._largest_count("hessian_step")

    def last_refresh_step(self) -> int | None:
        """``steps_taken()`` when the last estimate was folded into h; None before the first."""
        return self._largest_count("last_refresh_step") if self.refreshes_done() else None

    def _largest_count(self, key: str) -> int:
        return self._largest_counts((key,))[0]

    def _largest_counts(self, keys: tuple[str, ...]) -> list[int]:
        """The largest value of each counter in ``keys`` over all states, read in one pass.

        The counters live on the CPU (see ``_state_for``): reading them never syncs a device.
        """
        states = self.state.values()
        return [int(max((s[key].item() for s in states if key in s), default=0))
                for key in keys]

    def hessian_due(self) -> bool:
        """True when a Hessian refresh (``update_hessian``) is owed before the next step.

        The next refresh is due ``refresh_every`` (k) steps after the last one, the first
        after k steps — or before the first step with ``refresh_at_start=True``. A loop that
        refreshes whenever one is due therefore refreshes after steps k, 2k, … (0, k, 2k, …
        with ``refresh_at_start``). A refresh stays owed until one is folded in (one that
        returns False is retried at the next ask), and asking before and after ``step()`` in
        one loop never refreshes twice. Changing ``refresh_every`` mid-run counts from the
        last refresh: k 10 → 100 after a refresh at step 500 makes the next due at step 600.
        The interval is the first parameter group's: the refresh is one backward for all.
        Reads CPU counters only: no device sync.
        """
        first = self.param_groups[0]
        refresh_at_start: bool = first["refresh_at_start"]
        refresh_every: int = first["refresh_every"]
        taken, refreshes, last = self._largest_counts(_COUNT_KEYS)
        if not refreshes:
            return refresh_at_start or taken >= refresh_every
        return taken >= last + refresh_every

    # ---------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def unclipped_fraction(self) -> float:
        """Fraction of coordinates with ``|m| < ρ·h``: those the clip leaves alone.

        The official code logs it as "win rate". 0.0 before any state exists or when every
        coordinate is clipped (a pure sign step). Counted over whole parameters: with FSDP2
        (DTensor) parameters this is a collective, to be called on every rank. NaN when a
        state is on the meta device, which holds no values to count (and ``unclipped_band``
        then leaves ρ as it is).
        """
        return self._unclipped_fraction(self.param_groups)

    def _unclipped_fraction(self, groups: list[dict[str, Any]],
                            rho: float | None = None) -> float:
        """``unclipped_fraction`` over ``groups``, each at its own ρ or at ``rho``."""
        states: list[Tensor] = []
        counts: list[Tensor] = []
        sizes: list[int] = []
        for group in groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state or "exp_avg" not in state:
                    continue
                if state["exp_avg"].device.type == "meta":
                    return math.nan
                exp_avg, hessian = local_shards(state["exp_avg"], state["hessian"])
                if exp_avg.dtype == torch.uint8:  # ρh in float32, as the step computes it
                    exp_avg, hessian = decoded(state, "exp_avg"), decoded(state, "hessian")
                count, size = unclipped_count(exp_avg, hessian, group["rho"] if rho is None
                                              else rho)
                states.append(state["exp_avg"])
                counts.append(count)
                sizes.append(size)
        # one device-to-host read for all parameters, not one each
        values: list[int] = (torch.stack([c.to(counts[0].device) for c in counts]).tolist()
                             if counts else [])
        unclipped, total = sum_over_shards(zip(states, values, sizes))
        return unclipped / total if total else 0.0

    # ------------------------------------------------------------ after a Hessian refresh
    @torch.no_grad()
    def _fold(self, estimates: list[tuple[Tensor, Tensor]], *, squared: bool,
              scale: float | Tensor, grad_scale: float | Tensor | None) -> bool:
        """The tail every ``update_hessian`` shares: check, fold into h, count, adapt ρ.

        Args:
            estimates: (parameter, e) pairs; the estimate is ĥ = scale·e⊙e / grad_scale²
                when ``squared`` (Gauss-Newton-Bartlett: e is a sampled-label gradient),
                else ĥ = scale·e / grad_scale (Hutchinson: e = u⊙(∇²L·u)).
            scale, grad_scale: validated by the caller where they are numbers.

        Returns:
            True when folded; False when ``grad_scale`` is given and an e is not finite.

        Every check runs before anything is written: a refused refresh (a ValueError, or
        False) leaves h, the counters and ρ as they were. Without ``grad_scale`` nothing is
        read back from the device; with it, one host read checks every e and the value of a
        Tensor ``scale`` or ``grad_scale`` together.
        """
        name = type(self).__name__
        if any(e.is_sparse for _, e in estimates):
            raise RuntimeError(f"{name} does not support sparse gradients (update_hessian got "
                               "one); use a dense gradient, e.g. nn.Embedding(sparse=False)")
        # divided twice, not by grad_scale², which can underflow to 0
        coefficient = scale if squared else 1.0
        if grad_scale is not None:
            coefficient = coefficient / grad_scale / grad_scale if squared \
                else coefficient / grad_scale
        plans = []  # (group, params, es, weights): computed first, written last
        for group in self.param_groups:
            members = {p for p in group["params"]}
            pairs = [(p, e) for p, e in estimates if p in members]
            params = [p for p, _ in pairs]
            weights = self._fold_weights(group, params)
            for param, weight in zip(params, weights):
                check_representable(coefficient, weight, computed_dtype(param, self.state_dtype),
                                     scale, grad_scale)
            plans.append((group, params, [e for _, e in pairs], weights))
        if grad_scale is not None and not finite_and_valid(
                [e for _, e in estimates], scale if squared else None, grad_scale):
            return False
        taken = self.steps_taken()
        seeds = self._seeds() if self.state_dtype in NARROW_STATE else {}
        eight_bit = self.state_dtype == torch.uint8
        for group, params, es, weights in plans:
            hessians, locals_, keys, absmaxes = [], [], [], []
            for param, e in zip(params, es):
                check_eight_bit_param(param, self.state_dtype)
                state = self._state_for(param)
                _, hessian, e = local_shards(param, state["hessian"], e)
                hessians.append(hessian)
                locals_.append(e)
                if eight_bit:
                    absmaxes.append(state["hessian_absmax"])
                if seeds:  # the count this fold makes, as steps count for m
                    refreshes = int(state.get("hessian_step", torch.tensor(0.0)).item()) + 1
                    keys.append(rounding_key(seeds[param], refreshes, H_STREAM))
            rounding_keys = keys if seeds else None
            block_absmaxes = absmaxes if eight_bit else None
            if squared:
                gauss_newton_ema_update(hessians, locals_, beta2=group["betas"][1],
                                        scale=coefficient, weights=weights,
                                        foreach=group["foreach"], rounding_keys=rounding_keys,
                                        absmaxes=block_absmaxes)
            else:
                if grad_scale is not None:
                    locals_ = [e / grad_scale for e in locals_]
                hessian_ema_update(hessians, locals_, beta2=group["betas"][1], weights=weights,
                                   foreach=group["foreach"], rounding_keys=rounding_keys,
                                   absmaxes=block_absmaxes)
            for param in params:
                state = self.state[param]
                for key in ("hessian_step", "last_refresh_step"):  # absent from old states
                    state.setdefault(key, torch.tensor(0.0, dtype=torch.float32))
                state["hessian_step"].add_(1)
                state["last_refresh_step"].fill_(taken)
        self._adapt_rho()
        return True

    def _seeds(self) -> dict[Tensor, int]:
        """Each parameter's stochastic-rounding seed: its index over all groups, the number
        ``state_dict`` gives it, so that data-parallel replicas round alike and a resumed run
        rounds as the uninterrupted one."""
        params = [p for group in self.param_groups for p in group["params"]]
        return {param: ordinal for ordinal, param in enumerate(params)}

    def _fold_weights(self, group: dict[str, Any], params: list[Tensor]) -> list[float]:
        """The EMA weight of one more estimate for each of ``params`` (nothing is counted).

        Without bias correction the weight is ``1 − β2``. With it, the r-th estimate gets
        ``(1 − β2) / (1 − β2^r)``: the first replaces h outright, and h stays equal to the
        bias-corrected EMA ``h_ema / (1 − β2^r)`` at every refresh, so the step needs no
        correction of its own.
        """
        beta2 = group["betas"][1]
        if not group["bias_correction"]:
            return [1 - beta2] * len(params)
        zero = torch.tensor(0.0, dtype=torch.float32)
        counters = [self.state.get(p, {}).get("hessian_step", zero) for p in params]
        if not counters:
            return []
        return [(1 - beta2) / (1 - beta2 ** (r + 1)) for r in torch.stack(counters).tolist()]

    @torch.no_grad()
    def _adapt_rho(self) -> None:
        """Move each group's ρ, by factors of √2, until its unclipped fraction (counted now,
        at a refresh) lies in the group's ``unclipped_band`` or 16 moves are spent."""
        for group in self.param_groups:
            band = group["unclipped_band"]
            if band is None:
                continue
            low, high = band
            rho, fraction = group["rho"], self._unclipped_fraction([group])
            direction = 1 if fraction < low else -1 if fraction > high else 0
            for _ in range(_MAX_RHO_MOVES if direction else 0):
                rho = rho * _RHO_FACTOR ** direction
                fraction = self._unclipped_fraction([group], rho)
                if low <= fraction <= high or (direction > 0) != (fraction < low):
                    break
            group["rho"] = rho

    # --------------------------------------------------------- state_dict dtype handling
    # torch casts every loaded floating-point state tensor but "step" to its parameter's dtype.
    # That would round the float32 m and h of bf16 parameters to bf16, and the refresh count
    # too (bf16 counts exactly only to 256); these hooks put the saved tensors back.
    @staticmethod
    def _remember_state_dtypes(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        assert isinstance(optimizer, SophiaBase)  # registered on SophiaBase instances only
        saved: dict[int, dict[str, Tensor]] = {}
        for param_id, param_state in state_dict["state"].items():
            missing = [key for key in _REQUIRED_KEYS if key not in param_state]
            if missing:  # refuse before anything is loaded: step() would fail on it later
                raise ValueError(
                    f"{type(optimizer).__name__}.load_state_dict: the state of parameter "
                    f"{param_id} lacks {missing} (it has {sorted(param_state)}); is this "
                    "another optimizer's state_dict? Load a SophiaG/SophiaH state, or start "
                    "this optimizer fresh"
                )
            saved[param_id] = {k: v for k, v in param_state.items()
                               if k in _STATE_KEYS + _COUNT_KEYS + tuple(ABSMAX_KEYS.values())}
        optimizer._saved_state_for_load = (saved, [g["params"] for g in state_dict["param_groups"]])

    @staticmethod
    def _restore_state_dtypes(optimizer: Optimizer) -> None:
        assert isinstance(optimizer, SophiaBase)  # registered on SophiaBase instances only
        saved, saved_ids = optimizer.__dict__.pop("_saved_state_for_load", ({}, []))
        for ids, group in zip(saved_ids, optimizer.param_groups):
            for param_id, param in zip(ids, group["params"]):
                saved_state = saved.get(param_id, {})
                state = optimizer.state[param]
                for key, value in saved_state.items():
                    if key in _COUNT_KEYS and isinstance(value, Tensor):
                        # counters stay float32 on the CPU, as torch's step
                        state[key] = value.to(device="cpu", dtype=torch.float32, copy=True)
                for key in _STATE_KEYS:
                    if isinstance(saved_state.get(key), Tensor):
                        load_state_tensor(param, state, key, saved_state,
                                          optimizer.state_dtype, type(optimizer).__name__)
        optimizer._infer_last_refresh_steps()

class SophiaG(SophiaBase):
    r"""Sophia with the Gauss-Newton-Bartlett Hessian estimate, for softmax/cross-entropy models.

    Every ``step()``::

        θ ← θ·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  θ ← θ − lr·clamp(m / max(ρ·h, ε), −1, 1)

    Every ``refresh_every`` steps (when ``hessian_due()``), the user back-propagates the
    sampled-label loss of :func:`sophia_pytorch.sampled_cross_entropy` and calls
    ``update_hessian(scale=B)``, which folds ĥ = B·g⊙g into h: ``h ← β2·h + (1 − β2)·ĥ``.
    m and h start at zero. ``SophiaG(params, **OFFICIAL_DEFAULTS)`` is the authors' SophiaG.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default 1e-4); a float or a tensor of one element (any shape).
        betas: (β1, β2), EMA coefficients of m and h (default (0.965, 0.99)).
        rho: γ, the clipping scale of h against |m| (default 0.04).
        weight_decay: decoupled weight decay (default 0.1).
        eps: floor of the denominator ρh (default 1e-15).
        maximize: maximise the objective instead of minimising it (default False).
        foreach: use the multi-tensor path; None picks it on accelerators (default None).
        fused: use the one-pass CPU kernel of :mod:`sophia_pytorch._kernel`, bitwise equal to the
            for-loop; None takes it for CPU parameters when it can be built, else falls back
            with one warning (and for a Tensor ``lr``); True raises as torch's fused optimizers
            do: at construction if it cannot be built, at ``step()`` for a parameter it cannot
            step (not on the CPU, e.g. CUDA or meta; not floating point). With a Tensor ``lr``
            the kernel reads its value each step, as torch's CPU-fused AdamW (default None).
        refresh_every: k, the Hessian refresh interval used by ``hessian_due()`` (default 10).
        bias_correction: keep h equal to its bias-corrected EMA, ``h_ema / (1 − β2^r)`` after
            r refreshes: the first estimate sets h instead of adding 1% of itself (with
            β2 = 0.99 an uncorrected h is still 18% of its scale after 20 refreshes), so ρ
            means the same early and late in training (default False).
        refresh_at_start: make a refresh due before the first step (``hessian_due()`` is True
            at step 0), so that the first steps are already preconditioned instead of taking
            full sign steps against h = 0 (default False).
        unclipped_band: ``(low, high)`` or None. After every refresh, each group's ρ moves by
            factors of √2 until the fraction of unclipped coordinates (|m| < ρh, counted
            at that refresh) lies in the band — the official advice of keeping it in 0.1–0.5,
            automated. ``group["rho"]`` then holds the current ρ (default None: fixed ρ).
        state_dtype: None (m and h in float32, or float64 for float64 parameters),
            ``torch.bfloat16`` or ``torch.uint8``, the dtype m and h are stored in, for
            float32, bf16 and fp16 parameters. bfloat16: 2 bytes each a parameter.
            ``torch.uint8``: 8-bit block-wise quantized state (Dettmers et al., 2021), a byte
            each and a float32 absmax per block of 256 (``state["exp_avg_absmax"]``,
            ``state["hessian_absmax"]``), m in a signed dynamic code, h in an unsigned one
            (see ``sophia_pytorch._quantize``); a block that holds NaN or inf decodes to NaN
            whole. Either way the update is computed in float32 and m and h are rounded back
            stochastically (unbiased), the random bits a hash of the parameter's index, the
            step (or refresh count) and the element, so every path rounds alike and a resume
            is bit-identical. 8-bit state steps on the for-loop and foreach paths, in torch
            ops (on the CPU far slower than the fused step: it saves memory, not time); it
            refuses ``fused=True`` and DTensor (FSDP2) parameters with a ValueError, and under
            ``torch.compile`` its quantization runs eagerly (a graph break). It is the
            optimizer's, not a group's: a loaded ``state_dict`` is converted to it (float32
            → bf16 or 8-bit to nearest, bf16 → float32 exactly, 8-bit → float decoded)
            (default None).

    Migrating from the official ``SophiaG``: where it called ``update_hessian()`` and
    ``step(bs=bs)``, call ``update_hessian(scale=bs)`` and ``step()``; the trajectories agree.
    """

    _hessian_is_nonnegative = True  # ĥ = B·g⊙g

    @torch.no_grad()
    def update_hessian(self, scale: float | Tensor = 1.0, *,
                       grad_scale: float | Tensor | None = None) -> bool:
        """Fold ĥ = ``scale``·g⊙g into h, g = p.grad, for every parameter with a gradient.

        Args:
            scale: B, the number of samples in the mean sampled-label loss whose gradient
                is in ``p.grad`` — counted over all data-parallel ranks (default 1.0); a
                number >= 0 or a 0-dim tensor (read without a host sync unless
                ``grad_scale`` is given, so its value is checked only then).
            grad_scale: the loss scale the gradients carry, when they were produced by
                ``scaler.scale(loss).backward()`` (``scaler.get_scale()``), a finite
                number greater than 0 or a 0-dim tensor; g is unscaled by it, and a
                non-finite g skips the refresh. The scaler itself is not touched.

        Returns:
            True when the estimate was folded in; False when skipped (non-finite gradient
            under ``grad_scale``), leaving h and every counter as they were.

        Raises:
            ValueError: an invalid ``scale`` or ``grad_scale`` (a Tensor one with
                ``grad_scale`` given), or one whose ĥ coefficient overflows h's dtype;
                nothing is changed.
            RuntimeError: a sparse gradient.
        """
        check_scale("scale", scale, positive=False)
        if grad_scale is not None:
            check_scale("grad_scale", grad_scale, positive=True)
        estimates = [(p, p.grad) for group in self.param_groups for p in group["params"]
                     if p.grad is not None]
        return self._fold(estimates, squared=True, scale=scale, grad_scale=grad_scale)


class SophiaH(SophiaBase):
    r"""Sophia with the Hutchinson Hessian estimate, for any twice-differentiable loss.

    The step is SophiaG's. ``update_hessian(closure)`` re-evaluates the loss, draws u with
    i.i.d. ±1 entries, computes ĥ = u⊙(∇²L·u) with one Hessian-vector product (a double
    backward, on refresh steps only) and folds it in: ``h ← β2·h + (1 − β2)·ĥ``. Under an
    initialised ``torch.distributed`` process group ĥ is averaged across ranks, since a
    double backward bypasses DistributedDataParallel's gradient all-reduce.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default 1e-4); a float or a tensor of one element (any shape).
        betas: (β1, β2) (default (0.965, 0.99)).
        rho: γ (default 0.04). Our choice, not the paper's tuning: the same as SophiaG,
            since both estimators target the diagonal of the mean loss's curvature.
        weight_decay: decoupled weight decay (default 0.1).
        eps: floor of ρh (default 1e-15). A negative ĥ can make h negative; the floor turns
            such a coordinate's update into a full sign step, never a reversed one.
        maximize: as in :class:`SophiaG` (default False).
        foreach: as in :class:`SophiaG` (default None).
        fused: as in :class:`SophiaG` (default None).
        refresh_every: as in :class:`SophiaG` (default 10).
        bias_correction: as in :class:`SophiaG` (default False).
        refresh_at_start: as in :class:`SophiaG` (default False).
        unclipped_band: as in :class:`SophiaG` (default None).
        state_dtype: as in :class:`SophiaG`, but not ``torch.uint8``: 8-bit state keeps h
            in an unsigned code and a Hutchinson h can be negative, so it raises ValueError
            (default None).
    """

    def update_hessian(
        self,
        closure: Callable[[], Tensor],
        *,
        generator: torch.Generator | None = None,
        math_attention: bool = True,
        grad_scale: float | Tensor | None = None,
    ) -> bool:
        """Draw a Hutchinson estimate of the Hessian diagonal and fold it into h.

        Args:
            closure: recomputes and returns the scalar loss; must not call backward.
            generator: random source of the probes (default: torch's global generator).
                Use the same seed on every rank for identical probes under data parallel.
            math_attention: evaluate the closure under the math attention backend, which
                has the double backward that fused attention kernels lack (default True).
            grad_scale: the scale the closure's loss carries (``scaler.scale(loss)`` under a
                GradScaler), a finite number > 0 or a 0-dim tensor; ĥ is divided by it, and
                a non-finite ĥ skips the refresh (default None: no scale).

        Returns:
            True when the estimate was folded in; False when skipped (non-finite estimate
            under ``grad_scale``) — the same contract as :meth:`SophiaG.update_hessian`.
        """
        if grad_scale is not None:
            check_scale("grad_scale", grad_scale, positive=True)
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if any(is_dtensor(p) for p in params):
            raise NotImplementedError(
                "SophiaH does not support DTensor parameters (FSDP2 `fully_shard`): FSDP2 "
                "all-gathers them outside autograd, so no Hessian-vector product reaches the "
                "shards. Use DistributedDataParallel, or SophiaG, for data-parallel SophiaH."
            )
        estimates = _hutchinson_estimate(
            closure, params, generator=generator, math_attention=math_attention
        )
        present = [(p, e) for p, e in zip(params, estimates) if e is not None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            all_reduce_mean([e for _, e in present])
        return self._fold(present, squared=False, scale=1.0, grad_scale=grad_scale)
