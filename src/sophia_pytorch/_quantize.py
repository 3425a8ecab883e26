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
as the one above it: 64 in (0.1, 1], 32 in (0.01, 0.1], …, one (10^−6) in (10^−7, 10^−6].
The spacing in decade E is 0.9·10^−E/2^F: 0.014 of the absmax in (0.1, 1], which is 1.4% of
a value near 1 and 14% of one near 0.1 (0.9/2^F relative at the decade's floor, 28% one
decade down). 255 distinct values (+0 and −0 coincide) span ±[10^−6, 1] and 0; values below
10^−6 of the absmax round between 0 and 10^−6. The *unsigned* code, for the
Hessian EMA (Gauss-Newton-Bartlett's h ≥ 0), gives the sign bit to the fraction, as the
paper's "dynamic quantization" does: F = 7 − E, 128 values in (0.1, 1] down to two in
(10^−7, 10^−6], plus the code with no indicator and fraction 1, 10^−7, and 0: 256 values
spanning [10^−7, 1] and 0.

The stored byte is not the tree's bit pattern but the value's rank in the code's sorted table
(:attr:`DynamicCode.values`): consecutive bytes are neighbouring values, which is what
rounding needs. Signed: bytes 0 … 254 are −1 … 1, 127 is 0 (255 is unused and decodes as NaN);
unsigned: bytes 0 … 255 are 0 … 1.

Rounding: |x| / absmax lies between two neighbouring code values lo ≤ v ≤ hi (the codes are
symmetric: the sign is kept apart). Stochastic rounding takes hi with probability
(v − lo)/(hi − lo), so its expectation is v: an EMA that
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
from collections.abc import Callable
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
    """One 8-bit code: its name and sorted values (float32), with lookup tables per device."""

    name: str
    values: tuple[float, ...]
    _tables: dict[tuple[str, torch.device], Tensor] = field(default_factory=dict, compare=False,
                                                            repr=False)

    @property
    def zero(self) -> int:
        """The byte that decodes to 0."""
        return self.values.index(0.0)

    @property
    def signed(self) -> bool:
        return self.values[0] < 0

    def table(self, device: torch.device) -> Tensor:
        """The values as a float32 tensor of 256 on ``device`` (bytes past the code: NaN)."""
        return self._cached("table", device, lambda: torch.tensor(
            list(self.values) + [math.nan] * (256 - len(self.values)), dtype=torch.float32))

    def magnitudes(self, device: torch.device) -> Tensor:
        """The code's values >= 0, ascending (float32), then +inf: rounding works on |v|."""
        return self._cached("magnitudes", device, lambda: torch.tensor(
            [v for v in self.values if v >= 0] + [math.inf], dtype=torch.float32))

    def gaps(self, device: torch.device) -> Tensor:
        """``(magnitudes[i + 1] − magnitudes[i])·2⁻²⁴``: the gap above each magnitude, scaled
        to multiply a 24-bit uniform integer (exactly: a power of two); +inf above 1."""
        def build() -> Tensor:
            magnitudes = self.magnitudes(torch.device("cpu")).double()
            return ((magnitudes[1:] - magnitudes[:-1]) * 2.0 ** -_UNIFORM_BITS).float()
        return self._cached("gaps", device, build)

    def buckets(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(floors, splits) for each of the 2¹⁶ buckets ``bits >> 15`` of a float32 >= 0:
        floors (int32) is the index in :meth:`magnitudes` of the largest value <= the
        bucket's start; splits (float32) the code value inside the bucket, or +inf if none.
        The magnitude below v is ``floors[b] + (v >= splits[b])``.

        A bucket spans 2⁻⁸ of its binade, narrower than the code's spacing there, so at most
        one code value lies inside it. Buckets past 1 (and inf and NaN, which only blocks
        whose absmax is NaN hold) map to 1.
        """
        def build() -> tuple[Tensor, Tensor]:
            magnitudes = self.magnitudes(torch.device("cpu"))[:-1]
            starts = (torch.arange(1 << 16, dtype=torch.int32) << _BUCKET_SHIFT).view(
                torch.float32).clamp(max=1.0)
            floors = torch.searchsorted(magnitudes, starts, right=True, out_int32=True) - 1
            ends = torch.cat([torch.searchsorted(magnitudes, starts[1:], out_int32=True),
                              torch.tensor([magnitudes.numel()], dtype=torch.int32)])
            assert int((ends - floors).max()) <= 2, "a bucket holds two code values"
            inside = ends - floors == 2  # ends: the first value at or past the next bucket
            splits = torch.where(inside, magnitudes[(floors + 1).clamp(max=len(magnitudes) - 1)],
                                 math.inf)
            return floors, splits
        if ("floors", device) not in self._tables:
            floors, splits = build()
            self._tables[("floors", device)] = floors.to(device)
            self._tables[("splits", device)] = splits.to(device)
        return self._tables[("floors", device)], self._tables[("splits", device)]

    def _cached(self, kind: str, device: torch.device, build: Callable[[], Tensor]) -> Tensor:
        table = self._tables.get((kind, device))
        if table is None:
            table = self._tables[(kind, device)] = build().to(device)
        return table


_BUCKET_SHIFT = 23 - 8  # keep the exponent and 8 mantissa bits of |v|


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


def _blocks(flat: Tensor) -> Tensor:
    """1-D ``flat`` as (blocks, 256): a view where 256 divides it, else a zero-padded copy."""
    numel = flat.numel()
    if numel % BLOCK:
        flat = torch.nn.functional.pad(flat, (0, num_blocks(numel) * BLOCK - numel))
    return flat.view(-1, BLOCK)


def _chunks(numel: int, device: torch.device) -> list[tuple[int, int]]:
    """(start, stop) spans that cover ``numel`` elements, whole blocks each but the last: on
    the CPU 2¹⁸ elements, so that the twenty-odd passes of torch ops that quantizing a chunk
    takes run in cache and reuse their buffers instead of faulting in fresh memory (1.6x
    faster at 25M elements than whole tensors)."""
    size = (1 << 18) if device.type == "cpu" else (1 << 26)
    return [(start, min(start + size, numel)) for start in range(0, numel, size)]


def _scale_by_block_(values: Tensor, scales: Tensor) -> None:
    """``values[i] *= scales[i // 256]``, in place, for 1-D ``values``."""
    full = values.numel() // BLOCK * BLOCK
    values[:full].view(-1, BLOCK).mul_(scales[:full // BLOCK].view(-1, 1))
    if full < values.numel():
        values[full:].mul_(scales[-1])


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
    values = code.table(codes.device).index_select(0, _flat(codes).int())
    _scale_by_block_(values, absmax)
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
            to nearest (ties toward the smaller magnitude), for one-off conversions.

    Rounding acts on |v| (the code is symmetric), so a negative v rounds as its magnitude
    does; the code value below |v| is found from a table indexed by |v|'s top float bits.
    Runs eagerly under ``torch.compile`` (a graph break).
    """
    if values.dtype != torch.float32:
        raise TypeError(f"quantize_ takes float32 values, got {values.dtype}")
    if values.stride() != codes.stride():
        values = torch.empty_like(codes, dtype=torch.float32).copy_(values)
    flat, flat_codes = _flat(values), _flat(codes)
    for start, stop in _chunks(flat.numel(), codes.device):
        block_slice = slice(start // BLOCK, num_blocks(stop))
        flat_codes[start:stop].copy_(
            _encode(flat[start:stop], absmax[block_slice], code, key, start))


def _encode(values: Tensor, absmax: Tensor, code: DynamicCode, key: int | None,
            offset: int) -> Tensor:
    """The bytes (int32) of 1-D float32 ``values`` that start at element ``offset`` of their
    tensor, at a block's start; writes their blocks' ``absmax``."""
    numel, device = values.numel(), values.device
    blocks = _blocks(values)
    low_high = torch.aminmax(blocks, dim=1)  # NaN where a block holds NaN
    scale = torch.maximum(low_high.min.neg(), low_high.max)
    # |x| <= absmax, so the correctly rounded quotient lies in [-1, 1]; an inf block gives
    # 0 and NaN, a NaN block x itself: codes that its NaN absmax decodes to NaN anyway
    normalized = (blocks / torch.where(scale > 0, scale, 1.0).view(-1, 1)).view(-1)[:numel]
    absmax.copy_(torch.where(scale.isfinite(), scale, math.nan))
    # |v|, or v clamped to >= 0 with -0.0 made +0.0: the sign bit would index no bucket
    magnitude = normalized.abs() if code.signed else normalized.clamp(min=0.0).abs_()
    floors, splits = code.buckets(device)
    bucket = magnitude.view(torch.int32) >> _BUCKET_SHIFT
    low = floors.index_select(0, bucket)
    low += (magnitude >= splits.index_select(0, bucket)).to(torch.int32)
    del bucket
    magnitude -= code.magnitudes(device).index_select(0, low)
    gap = code.gaps(device).index_select(0, low)  # ·2⁻²⁴; inf above 1, which stays
    if key is None:
        up = magnitude > gap.mul_(2.0 ** (_UNIFORM_BITS - 1))
    else:
        noise = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
        noise.bitwise_xor_(key & _MASK).mul_(_MUL1).bitwise_right_shift_(32 - _UNIFORM_BITS)
        noise.bitwise_and_((1 << _UNIFORM_BITS) - 1)
        up = gap.mul_(noise.to(torch.float32)) < magnitude  # P(up) = (|v| − below)/gap
    low += up.to(torch.int32)
    if code.signed:  # the byte of −v is zero − (the byte of |v| − zero)
        negative = normalized.view(torch.int32) >> 31  # −1 where the sign bit is set, else 0
        low.bitwise_xor_(negative).sub_(negative)
    return low.add_(code.zero)


def quantize(values: Tensor, code: DynamicCode, key: int | None = None) -> tuple[Tensor, Tensor]:
    """New 8-bit state (codes, absmax) holding float32 ``values`` (see :func:`quantize_`);
    the codes take ``values``' shape and, where dense, its strides."""
    codes = torch.empty_like(values, dtype=torch.uint8)
    if not _dense(codes):
        codes = codes.contiguous()
    absmax = torch.empty(num_blocks(values.numel()), dtype=torch.float32, device=values.device)
    quantize_(codes, absmax, values, code, key)
    return codes, absmax
