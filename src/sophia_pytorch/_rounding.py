"""Stochastic rounding of float32 values into bfloat16 state, from a counter-based hash.

A float32 value x lies between two neighbouring bfloat16 values lo ≤ x ≤ hi. Stochastic
rounding returns hi with probability (x − lo)/(hi − lo) and lo otherwise, so its expectation is
x: an exponential moving average stored in bf16 keeps moving by updates far below bf16's
resolution (2⁻⁸ relative) instead of stalling, as round-to-nearest makes it.

The bits: a float32 is sign | exponent | 16 high mantissa bits | 16 low mantissa bits, and
bf16 keeps the top 16. Adding a uniform random r ∈ [0, 2¹⁶) to the 32-bit pattern and keeping
the top half rounds the magnitude up exactly when r ≥ 2¹⁶ − (low 16 bits), i.e. with
probability (low bits)/2¹⁶; a carry moves into the exponent as it should, ±inf stay inf, and
NaN becomes bf16's canonical NaN (0x7FC0).

r is not drawn from a generator: it is the top 16 bits of ``(index ^ key)·C mod 2³²`` (C odd),
where index is the element's offset in the tensor's memory (mod 2³²) and ``key =
rounding_key(seed, counter, stream)`` is a strong hash of a per-tensor seed, a step counter
and the stream (m or h). Over steps the key is uniform, and multiplying by an odd C permutes
the 32-bit values, so each element's r is uniform: the rounding is unbiased. Within one step
the r of neighbouring elements follow a multiplicative (Weyl) sequence, spread evenly over
[0, 2¹⁶). One multiply per element, not a full hash, keeps the fused kernel's bf16 step
within its memory time. The same inputs always round the same way, on any path (for-loop,
foreach, the fused C++ kernel, which computes the same integers) and after a resume.

``hash32`` (for the keys) is C. Wellons' hash-prospector ``[16 21f0aaad 15 735a2d97 15]``.
Both multipliers are below 2³¹, so in int64 tensors the product of a 32-bit value and a
multiplier is below 2⁶³: everything is computed exactly, without relying on signed overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["M_STREAM", "H_STREAM", "hash32_int", "rounding_key", "stochastic_round_bf16"]

_MASK = 0xFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97
_GOLDEN = 0x9E3779B9  # keeps seed 0 away from hash32's fixed point 0
M_STREAM, H_STREAM = 1, 2  # the stream of m's roundings (per step), of h's (per refresh)
_BF16_NAN = 0x7FC0


def hash32_int(x: int) -> int:
    """The 32-bit hash of a Python int (its low 32 bits), as an int in [0, 2³²)."""
    x &= _MASK
    x ^= x >> 16
    x = (x * _MUL1) & _MASK
    x ^= x >> 15
    x = (x * _MUL2) & _MASK
    x ^= x >> 15
    return x


def rounding_key(seed: int, counter: int, stream: int) -> int:
    """The 32-bit key of one tensor's roundings at one counter value.

    Args:
        seed: the tensor's seed (the optimizer uses the parameter's index in its groups, the
            number ``state_dict`` gives it, so that every data-parallel replica rounds alike).
        counter: the step (for m) or the refresh count (for h) after the update, >= 0.
        stream: :data:`M_STREAM` or :data:`H_STREAM`.
    """
    key = hash32_int((seed + _GOLDEN) & _MASK)
    key = hash32_int(key ^ (counter & _MASK))
    return hash32_int(key ^ stream)


def _memory_index(like: Tensor) -> Tensor:
    """Each element's offset in ``like``'s memory (int64, ``like``'s shape and device): the
    index the fused kernel, which walks memory in order, uses for it."""
    index = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    if _dense(like):
        return index.as_strided(like.shape, like.stride())
    return index.view(like.shape)


def _dense(tensor: Tensor) -> bool:
    """Whether ``tensor``'s elements fill a block of memory once each (any dim order)."""
    expected = 1
    for stride, size in sorted((t, s) for s, t in zip(tensor.shape, tensor.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# eager under torch.compile: inductor (torch 2.13) miscompiles its int64 bit operations
@torch.compiler.disable  # type: ignore[untyped-decorator]  # torch leaves it unannotated
def stochastic_round_bf16(x: Tensor, key: int) -> Tensor:
    """``x`` (float32, any shape) rounded stochastically to bfloat16; unbiased: E[out] = x.

    The random bits come from ``(index ^ key)·C`` (see the module docstring), so the
    result is a pure function of x, the key and the memory layout. NaN becomes bf16's NaN.
    Under ``torch.compile`` it runs eagerly (a graph break), so it rounds as it does
    uncompiled.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 takes float32, got {x.dtype}")
    bits = x.view(torch.int32).to(torch.int64) & _MASK
    noise = ((((_memory_index(x) & _MASK) ^ (key & _MASK)) * _MUL1) & _MASK) >> 16
    high = (bits + noise) >> 16
    high = torch.where(high >= 0x8000, high - 0x10000, high)
    high = torch.where(x.isnan(), _BF16_NAN, high)
    return high.to(torch.int16).view(torch.bfloat16)
