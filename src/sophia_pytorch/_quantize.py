"""8-bit block-wise quantization of optimizer state with the dynamic (tree) code.

A state tensor of n elements, read in memory order, is cut into blocks of :data:`BLOCK` = 256
(the last one short when 256 does not divide n). Each block stores its absmax — the largest
|x| in it — as one float32, and each element as one byte: the code of x / absmax, a value in
[−1, 1]. That is 1 + 4/256 bytes an element, against 4 for float32 and 2 for bfloat16.

The code is the dynamic tree code of Dettmers et al., "8-bit Optimizers via Block-wise
Quantization" (2021), built here from the paper's description. A byte of the *signed* code is
a sign bit followed by seven bits read as: E zero bits, a one (the indicator), then F = 6 − E
fraction bits j; its magnitude is ``10^−E · (0.1 + 0.9·(j + 1)/2^F)``, E = 0 … 6 — a decimal
exponent, then a linear fraction over the decade (10^−E−1, 10^−E] whose top value is the
decade's end. Seven zero bits (no indicator) are 0. So every decade holds half as many values
as the one above it: 64 in (0.1, 1], 32 in (0.01, 0.1], …, one (10^−6) in (10^−7, 10^−6]: a
relative spacing of 1.4% of 1 near 1 and of ~0.9·10^−E/2^F at 10^−E, with 255 distinct
values (+0 and −0 coincide) spanning ±[10^−6, 1] and 0. The *unsigned* code, for the
Hessian EMA (Gauss-Newton-Bartlett's h ≥ 0), gives the sign bit to the fraction, as the
paper's "dynamic quantization" does: F = 7 − E, 128 values in (0.1, 1] down to two in
(10^−7, 10^−6], plus the code with no indicator and fraction 1, 10^−7, and 0: 256 values
spanning [10^−7, 1] and 0.

The stored byte is not the tree's bit pattern but the value's rank in the code's sorted table
(:attr:`DynamicCode.values`): consecutive bytes are neighbouring values, which is what
rounding needs. Signed: bytes 0 … 254 are −1 … 1, 127 is 0 (255 is unused and decodes as NaN);
unsigned: bytes 0 … 255 are 0 … 1.

Rounding: x / absmax lies between two neighbouring code values lo ≤ v ≤ hi. Stochastic
rounding takes hi with probability (v − lo)/(hi − lo), so its expectation is v: an EMA that
moves by (1 − β)·|x − m|, far below the code's spacing, keeps moving on average instead of
stalling as round-to-nearest makes it. The uniform draw is the top 24 bits of
``(index ^ key)·C mod 2³²`` — the bits and keys of ``sophia_pytorch._rounding`` (see its
docstring), index the element's offset in the tensor's memory — so every path, and a resumed
run, rounds alike. The absmax element itself is ±1, a code value: it is stored exactly.

Blocks that hold NaN or ±inf: their absmax is stored as NaN and the whole block decodes to NaN
(a float32 state would keep the finite neighbours; here the fault is loud, not hidden in
rescaled neighbours). A block of zeros has absmax 0 and decodes to zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._rounding import _MASK, _MUL1, _dense

__all__ = ["BLOCK", "SIGNED", "UNSIGNED", "DynamicCode", "dequantize", "num_blocks",
           "quantize", "quantize_"]

BLOCK = 256
_UNIFORM_BITS = 24  # the top bits of the 32-bit product: exact in float32


def _decade_values(exponent: int, fraction_bits: int) -> list[float]:
    """The 2^F values of decade E: ``10^−E · (0.1 + 0.9·(j + 1)/2^F)``, j = 0 … 2^F − 1."""
    steps = 2 ** fraction_bits
    return [10.0 ** -exponent * (0.1 + 0.9 * (j + 1) / steps) for j in range(steps)]


def _dynamic_values(signed: bool) -> list[float]:
    """The sorted float64 values of the signed or unsigned dynamic code (module docstring)."""
    bits = 6 if signed else 7  # fraction bits of the top decade
    magnitudes = [0.0] + [v for e in range(7) for v in _decade_values(e, bits - e)]
    if not signed:
        magnitudes.append(1e-7)  # no indicator, fraction bit 1
        return sorted(magnitudes)
    return sorted([-m for m in magnitudes if m] + magnitudes)


@dataclass(frozen=True)
class DynamicCode:
    """One 8-bit code: its name, its sorted values (float32) and the byte of 0."""

    name: str
    values: tuple[float, ...]
    _tables: dict[torch.device, Tensor] = field(default_factory=dict, compare=False,
                                                repr=False)

    @property
    def zero(self) -> int:
        """The byte that decodes to 0."""
        return self.values.index(0.0)

    def table(self, device: torch.device) -> Tensor:
        """The values as a float32 tensor of 256 on ``device`` (bytes past the code: NaN)."""
        table = self._tables.get(device)
        if table is None:
            padded = list(self.values) + [math.nan] * (256 - len(self.values))
            table = torch.tensor(padded, dtype=torch.float32, device=device)
            self._tables[device] = table
        return table


def _code(name: str, signed: bool) -> DynamicCode:
    values = tuple(float(torch.tensor(v, dtype=torch.float32)) for v in _dynamic_values(signed))
    return DynamicCode(name, values)


SIGNED = _code("signed dynamic", signed=True)  # m: 255 values in [−1, 1]
UNSIGNED = _code("unsigned dynamic", signed=False)  # h: 256 values in [0, 1]


def num_blocks(numel: int) -> int:
    """The number of absmax values (blocks of :data:`BLOCK`) of a tensor of ``numel``."""
    return -(-numel // BLOCK)


def _flat(tensor: Tensor) -> Tensor:
    """``tensor``'s elements in memory order, as a 1-D view (``tensor`` must be dense)."""
    if tensor.is_contiguous():
        return tensor.reshape(-1)
    if not _dense(tensor):
        raise ValueError("8-bit state needs dense tensors (their elements filling a block of "
                         f"memory once each); got shape {tuple(tensor.shape)}, strides "
                         f"{tensor.stride()}")
    return tensor.as_strided((tensor.numel(),), (1,))


@torch.compiler.disable  # type: ignore[untyped-decorator]  # torch leaves it unannotated
def dequantize(codes: Tensor, absmax: Tensor, code: DynamicCode) -> Tensor:
    """The float32 values of 8-bit state.

    Args:
        codes: uint8, any shape, dense (any dim order); its elements in memory order form
            the blocks.
        absmax: float32, shape ``(num_blocks(codes.numel()),)``: each block's scale.
        code: :data:`SIGNED` or :data:`UNSIGNED`, the code ``codes`` were written in.

    Returns:
        float32, ``codes``' shape and strides: ``code.values[byte] · absmax[block]``. Runs
        eagerly under ``torch.compile`` (a graph break), so it decodes as uncompiled.
    """
    flat = _flat(codes)
    numel = flat.numel()
    decoded = code.table(codes.device)[flat.int()]
    blocks = num_blocks(numel)
    padded = torch.nn.functional.pad(decoded, (0, blocks * BLOCK - numel)).view(blocks, BLOCK)
    values = (padded * absmax.view(blocks, 1)).view(-1)[:numel]
    return values.as_strided(codes.shape, codes.stride())


@torch.compiler.disable  # type: ignore[untyped-decorator]  # torch leaves it unannotated
def quantize_(codes: Tensor, absmax: Tensor, values: Tensor, code: DynamicCode,
              key: int | None) -> None:
    """Write float32 ``values`` into 8-bit state, in place.

    Args:
        codes: uint8, ``values``' shape, dense; written.
        absmax: float32, ``(num_blocks(values.numel()),)``; written.
        values: float32, any shape; read in ``codes``' memory order. For :data:`UNSIGNED`
            they must be >= 0 (a negative value is stored as 0).
        code: :data:`SIGNED` or :data:`UNSIGNED`.
        key: the stochastic-rounding key (``sophia_pytorch._rounding.rounding_key``): the
            stored value is unbiased, a pure function of values, key and layout; None rounds
            to nearest (ties toward the smaller value), for one-off conversions.
    """
    if values.dtype != torch.float32:
        raise TypeError(f"quantize_ takes float32 values, got {values.dtype}")
    if values.stride() != codes.stride():
        values = torch.empty_like(codes, dtype=torch.float32).copy_(values)
    flat = _flat(values)
    numel = flat.numel()
    blocks = num_blocks(numel)
    padded = torch.nn.functional.pad(flat, (0, blocks * BLOCK - numel)).view(blocks, BLOCK)
    scale = padded.abs().amax(dim=1) if numel else padded.new_zeros(0)
    finite = scale.isfinite()
    divisor = torch.where(finite & (scale > 0), scale, 1.0).view(blocks, 1)
    # |x| <= absmax, so the correctly rounded quotient lies in [-1, 1]
    normalized = torch.where(finite.view(blocks, 1), padded / divisor, 0.0).view(-1)[:numel]
    table = code.table(codes.device)[:len(code.values)]
    low = (torch.searchsorted(table, normalized, right=True, out_int32=True) - 1).clamp_(
        0, len(code.values) - 2)
    below, above = table[low], table[low + 1]
    if key is None:
        up = (above - normalized) < (normalized - below)
    else:
        index = torch.arange(numel, dtype=torch.int64, device=codes.device)
        noise = ((((index & _MASK) ^ (key & _MASK)) * _MUL1) & _MASK) >> (32 - _UNIFORM_BITS)
        uniform = noise.to(torch.float32) * 2.0 ** -_UNIFORM_BITS
        # the top value (v = 1 is clamped to the last pair) is not left to the product's rounding
        up = (uniform * (above - below) < normalized - below) | (normalized >= above)
    _flat(codes).copy_(low + up)
    absmax.copy_(torch.where(finite, scale, math.nan))


def quantize(values: Tensor, code: DynamicCode, key: int | None = None) -> tuple[Tensor, Tensor]:
    """New 8-bit state (codes, absmax) holding float32 ``values`` (see :func:`quantize_`);
    the codes take ``values``' shape and, where dense, its strides."""
    codes = torch.empty_like(values, dtype=torch.uint8)
    if not _dense(codes):
        codes = codes.contiguous()
    absmax = torch.empty(num_blocks(values.numel()), dtype=torch.float32, device=values.device)
    quantize_(codes, absmax, values, code, key)
    return codes, absmax
