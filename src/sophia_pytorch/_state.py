"""How the optimizers store m and h under their ``state_dtype``: the dtype, fresh state, the
float values of 8-bit state, and the conversion of a loaded ``state_dict``.

float32 (or the parameter's dtype) by default, bfloat16, or 8-bit: uint8 codes shaped like the
parameter plus a float32 absmax per block of 256 under ``<key>_absmax``
(:mod:`sophia_pytorch._quantize`; m in the signed code, h in the unsigned one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dtensor import is_dtensor
from ._quantize import SIGNED, UNSIGNED, DynamicCode, dequantize, num_blocks, quantize

__all__ = ["ABSMAX_KEYS", "LOW_PRECISION", "NARROW_STATE", "check_eight_bit_param",
           "computed_dtype", "decoded", "load_state_tensor", "new_state_tensor", "state_dtype_for"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
NARROW_STATE = (torch.bfloat16, torch.uint8)  # state dtypes rounded stochastically, with keys
# 8-bit state: each state tensor's code and the key of its float32 block absmax
CODES: dict[str, DynamicCode] = {"exp_avg": SIGNED, "hessian": UNSIGNED}
ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "hessian": "hessian_absmax"}


def state_dtype_for(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The (real) dtype of m and h for ``param`` under the optimizer's ``state_dtype`` (see
    ``SophiaBase._state_for``)."""
    if state_dtype is not None:
        return state_dtype
    if param.dtype in LOW_PRECISION:
        return torch.float32
    return param.dtype.to_real() if param.dtype.is_complex else param.dtype


def computed_dtype(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype m and h are computed in: float32 for 8-bit state, else their own."""
    return torch.float32 if state_dtype == torch.uint8 else state_dtype_for(param, state_dtype)


def check_eight_bit_param(param: Tensor, state_dtype: torch.dtype | None) -> None:
    """Refuse a DTensor (FSDP2) parameter for 8-bit state: its blocks of 256 would follow
    each rank's shard, so the state would depend on the sharding."""
    if state_dtype == torch.uint8 and is_dtensor(param):
        raise ValueError("state_dtype=torch.uint8 does not support DTensor parameters (FSDP2 "
                         "`fully_shard`): its blocks of 256 would follow each rank's shard. "
                         "Use state_dtype=torch.bfloat16, or DistributedDataParallel")


def new_state_tensor(state: dict[str, Tensor], key: str, param: Tensor,
                     dtype: torch.dtype) -> None:
    """Put a zero m or h (``key``) of ``dtype`` for ``param`` into ``state``; 8-bit: codes of
    0 and a zero absmax per block."""
    if dtype == torch.uint8:
        state[key], state[ABSMAX_KEYS[key]] = quantize(
            torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format),
            CODES[key])
    else:
        state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)


def decoded(state: dict[str, Tensor], key: str) -> Tensor:
    """m or h (``key``) as numbers: 8-bit state decoded to float32, other state itself."""
    value = state[key]
    if value.dtype != torch.uint8:
        return value
    values: Tensor = dequantize(value, state[ABSMAX_KEYS[key]], CODES[key])
    return values


def load_state_tensor(param: Tensor, state: dict[str, Tensor], key: str,
                      saved: dict[str, Tensor], state_dtype: torch.dtype | None,
                      owner: str) -> None:
    """Put m or h (``key``) of a loaded state (``saved``) into ``state`` in ``state_dtype``:
    float32 into bf16 or 8-bit rounds to nearest (a one-off conversion), bf16 into float32 is
    exact, 8-bit into any other is decoded to float32 first. ``owner`` names the optimizer
    in the error an 8-bit state without its absmax raises."""
    value, absmax_key = saved[key], ABSMAX_KEYS[key]
    device = param.device
    if value.dtype == torch.uint8:
        absmax = saved.get(absmax_key)
        if not isinstance(absmax, Tensor) or absmax.shape != (num_blocks(value.numel()),):
            raise ValueError(
                f"{owner}.load_state_dict: 8-bit {key} of shape {tuple(value.shape)} needs "
                f"{absmax_key} of shape ({num_blocks(value.numel())},), got "
                f"{tuple(absmax.shape) if isinstance(absmax, Tensor) else absmax!r}")
        absmax = absmax.to(device=device, dtype=torch.float32, copy=True)
        value = value.to(device=device, copy=True)
        if state_dtype == torch.uint8:
            state[key], state[absmax_key] = value, absmax
            return
        value = dequantize(value, absmax, CODES[key])
    state.pop(absmax_key, None)
    if state_dtype == torch.uint8:
        state[key], state[absmax_key] = quantize(value.to(device=device, dtype=torch.float32),
                                                 CODES[key])
    elif state_dtype is not None or param.dtype in LOW_PRECISION \
            or saved[key].dtype == torch.uint8:
        state[key] = value.to(device=device, dtype=state_dtype_for(param, state_dtype),
                              copy=True)
