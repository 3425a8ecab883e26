"""8-bit block-wise quantized optimizer state (``state_dtype=torch.uint8``): the code, the
rounding, the paths, checkpoints.

The code is checked against an independent decoding of the dynamic tree code's bit patterns
(Dettmers et al. 2021), the quantization against float64 neighbours from that decoding, and
the decision to round stochastically rather than to nearest against a float64 EMA.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sophia_pytorch
from sophia_pytorch import SophiaG, SophiaH
from sophia_pytorch._quantize import BLOCK, SIGNED, UNSIGNED, dequantize, quantize
from sophia_pytorch._rounding import M_STREAM, rounding_key
from sophia_pytorch.functional import gauss_newton_ema_update, sophia_update
from tests.optim.state_model import small_batch as _batch
from tests.optim.state_model import small_model as _model
from tests.optim.state_model import train as _train
from tests.optim.state_model import two_groups as _groups

U8 = torch.uint8
HYPER = dict(lr=3e-3, beta1=0.965, rho=0.04, weight_decay=0.1, eps=1e-15)


def _decode_tree_byte(byte: int, signed: bool) -> float:
    """One byte of the dynamic tree code, read bit by bit as the paper lays it out: (signed) a
    sign bit, or (unsigned) a fraction bit placed above the others; then E zero bits, a one,
    and the remaining bits j of the fraction: 10^−E·(0.1 + 0.9·(j + 1)/2^F). No one: 0, or
    (unsigned, fraction bit set) 10^−7."""
    top, tree = byte >> 7, byte & 0x7F
    zeros = next((e for e in range(7) if tree & (0x40 >> e)), 7)
    if zeros == 7:
        return 0.0 if signed or not top else 1e-7
    bits = 6 - zeros
    fraction = tree & ((1 << bits) - 1)
    if not signed:
        fraction |= top << bits
        bits += 1
    value = 10.0 ** -zeros * (0.1 + 0.9 * (fraction + 1) / 2**bits)
    return -value if signed and top else value


def _table(signed: bool) -> np.ndarray:
    """The code's distinct values, sorted, from the bit patterns (float32, as stored)."""
    values = {_decode_tree_byte(b, signed) for b in range(256)}
    return np.array(sorted(values), dtype=np.float32).astype(np.float64)


TABLES = {"signed": _table(True), "unsigned": _table(False)}
CODES = {"signed": SIGNED, "unsigned": UNSIGNED}


def _neighbours(normalized: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the code values around each float64 ``normalized`` (lo == hi on a value)."""
    high = np.searchsorted(table, normalized, side="left").clip(0, len(table) - 1)
    low = np.searchsorted(table, normalized, side="right").clip(1, len(table)) - 1
    return table[low], table[high]


def _blocks_absmax(x: np.ndarray) -> np.ndarray:
    """Each element's block absmax (blocks of 256 in order), in float64."""
    blocks = -(-x.size // 256)
    padded = np.zeros(blocks * 256)
    padded[:x.size] = np.abs(x)
    return np.repeat(padded.reshape(blocks, 256).max(axis=1), 256)[:x.size]


def _spread(size: int, seed: int, octaves: int = 20) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=generator) * torch.exp2(
        -torch.randint(0, octaves, (size,), generator=generator).float())


# ------------------------------------------------------------------------------ the code


@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_the_code_is_the_dynamic_tree_code_read_from_its_bit_patterns(name):
    table = TABLES[name]
    assert np.array_equal(np.array(CODES[name].values), table)
    assert table[-1] == 1.0 and (table[0] == -1.0 if name == "signed" else table[0] == 0.0)
    assert len(table) == (255 if name == "signed" else 256)
    # the decade (0.1, 1] holds 64 (signed) or 128 (unsigned) evenly spaced values
    top = table[table > 0.1 + 1e-7]
    assert len(top) == (64 if name == "signed" else 128)
    np.testing.assert_allclose(np.diff(top), 0.9 / len(top), rtol=1e-5)


@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_quantization_error_is_within_the_code_spacing(name):
    """Each decoded value is one of the two code values around x / absmax (times absmax):
    stochastically, an error below their spacing; to nearest, below half of it."""
    x = _spread(5000, 0)
    if name == "unsigned":
        x = x.abs()
    x64 = x.double().numpy()
    absmax = _blocks_absmax(x64)
    low, high = _neighbours(x64 / absmax, TABLES[name])
    spacing = (high - low) * absmax
    slack = 2.0**-22 * np.abs(x64)  # x / absmax and the decoding product are float32
    for key, share in ((rounding_key(1, 1, M_STREAM), 1.0), (None, 0.5)):
        codes, scales = quantize(x, CODES[name], key)
        assert codes.dtype == U8 and codes.shape == x.shape and scales.shape == (20,)
        assert np.array_equal(scales.double().numpy(), absmax[::256])
        decoded = dequantize(codes, scales, CODES[name]).double().numpy()
        assert np.all(np.abs(decoded - x64) <= share * spacing + slack)
    # the relative spacing the docstring states: ≤ 0.9·10^−E/2^F at the decade's floor 10^−E−1
    top_spacing = 0.9 / (64 if name == "signed" else 128)
    assert np.all(np.abs(decoded - x64) <= 0.5 * top_spacing * absmax + slack)


@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_stochastic_rounding_is_unbiased(name):
    """2048 values (8 blocks) quantized under 1024 keys: the mean decoded value is x within 5
    standard errors, p(1−p)(hi−lo)²/N being the variance of the mean of N roundings that go
    up with probability p. Round-to-nearest, put to the same test, fails it."""
    x = _spread(2048, 1, octaves=8)
    if name == "unsigned":
        x = x.abs()
    keys = 1024
    decoded = np.stack([
        dequantize(*quantize(x, CODES[name], rounding_key(5, k, M_STREAM)), CODES[name]).numpy()
        for k in range(keys)]).astype(np.float64)
    x64 = x.double().numpy()
    absmax = _blocks_absmax(x64)
    low, high = _neighbours(x64 / absmax, TABLES[name])
    spread = (high - low) * absmax
    p = np.divide(x64 / absmax - low, high - low, out=np.zeros_like(x64), where=high > low)
    bound = 5 * np.sqrt(p * (1 - p) / keys) * spread + 2.0**-22 * np.abs(x64) + 1e-300
    assert np.all(np.abs(decoded.mean(axis=0) - x64) <= bound)
    nearest = dequantize(*quantize(x, CODES[name]), CODES[name]).double().numpy()
    assert np.mean(np.abs(nearest - x64) > bound) > 0.9


def test_zero_nan_and_inf_blocks():
    """A block of zeros decodes to zeros (absmax 0); a block holding NaN or inf decodes to NaN
    throughout, its absmax NaN, and leaves the other blocks alone."""
    x = _spread(4 * BLOCK, 2)
    x[:BLOCK] = 0.0
    x[BLOCK + 7] = math.nan
    x[2 * BLOCK + 9] = -math.inf
    for code in (SIGNED, UNSIGNED):
        values = x if code is SIGNED else x.abs()
        for key in (None, 12345):
            codes, absmax = quantize(values, code, key)
            decoded = dequantize(codes, absmax, code)
            assert absmax[0] == 0 and torch.equal(decoded[:BLOCK], torch.zeros(BLOCK))
            assert absmax[1:3].isnan().all() and decoded[BLOCK:3 * BLOCK].isnan().all()
            last = values[3 * BLOCK:]
            assert absmax[3] == last.abs().max()
            assert decoded[3 * BLOCK:].isfinite().all()
            torch.testing.assert_close(decoded[3 * BLOCK:], last, atol=0.03 * absmax[3], rtol=0)


@pytest.mark.parametrize("shape", [(1000,), (3, 7, 11), (), (0,), (256,), (257,)])
def test_any_size_is_cut_into_blocks_of_256_the_last_one_short(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    codes, absmax = quantize(x, SIGNED, 77)
    assert codes.shape == x.shape and absmax.shape == (-(-x.numel() // 256),)
    flat = x.reshape(-1)
    for block in range(absmax.numel()):
        assert absmax[block] == flat[block * 256:(block + 1) * 256].abs().max()
    decoded = dequantize(codes, absmax, SIGNED)
    assert decoded.shape == x.shape
    largest = float(x.abs().amax()) if x.numel() else 0.0
    torch.testing.assert_close(decoded, x, atol=0.015 * largest, rtol=0)


def test_blocks_follow_memory_order():
    """A channels-last tensor quantizes as its memory, read in order, does; the codes keep
    its layout."""
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    codes, absmax = quantize(x, SIGNED, 99)
    flat_codes, flat_absmax = quantize(x.permute(0, 2, 3, 1).reshape(-1), SIGNED, 99)
    assert codes.stride() == x.stride()
    assert torch.equal(codes.permute(0, 2, 3, 1).reshape(-1), flat_codes)
    assert torch.equal(absmax, flat_absmax)
    assert dequantize(codes, absmax, SIGNED).stride() == x.stride()


def _ema_relative_bias(code_name: str, beta: float, steps: int, rounding: str) -> float:
    """The signed mean over 4080 coordinates of (m − m64)/m64 after ``steps`` updates
    m ← β·m + (1 − β)·x, m64 in float64 and m stored in 8 bits (computed in float32) by
    ``rounding``. Each coordinate starts at a value in [1/16, 1/8] and its target x is four
    times that; the first of each block of 256 holds 1 and stays there, so the block's
    absmax does not move and each coordinate must move on its own. (When a whole block moves
    together the absmax carries it and no rounding stalls.)"""
    code = CODES[code_name]
    start = torch.exp2(-3 - torch.rand(4096, generator=torch.Generator().manual_seed(4)))
    start[::BLOCK] = 1.0
    target = 4 * start
    target[::BLOCK] = 1.0
    codes, absmax = quantize(start, code)
    exact = dequantize(codes, absmax, code).double()
    for t in range(1, steps + 1):
        exact = beta * exact + (1 - beta) * target.double()
        value = dequantize(codes, absmax, code).mul_(beta).add_(target, alpha=1 - beta)
        key = rounding_key(0, t, M_STREAM) if rounding == "stochastic" else None
        codes, absmax = quantize(value, code, key)
    moving = torch.ones(4096, dtype=torch.bool)
    moving[::BLOCK] = False
    error = (dequantize(codes, absmax, code).double() - exact) / exact
    return float(error[moving].mean())


@pytest.mark.parametrize(("state", "beta"), [("m", 0.965), ("h", 0.99)])
def test_round_to_nearest_biases_the_ema_and_stochastic_rounding_does_not(state, beta):
    """The decision to round stochastically, in float64. To nearest an EMA stalls once
    (1 − β)·|x − m| falls below half the code's spacing (up to 0.9/64 of the absmax for m's
    signed code, 0.9/128 for h's unsigned one): m stops short of x by up to
    spacing/(2(1 − β)), 0.20 of the absmax for m and 0.35 for h — a systematic error.
    Stochastic rounding's error is noise: per coordinate its standard deviation is at most
    spacing/(2·√(1 − β²)) of the absmax, at most 16 times that of the value (m >= absmax/16),
    so the mean over 4080 coordinates is within 5/√4080 of that."""
    code_name = "signed" if state == "m" else "unsigned"
    spacing = 0.9 / (64 if state == "m" else 128)
    steps = int(5 / (1 - beta))
    noise = 16 * spacing / (2 * math.sqrt(1 - beta**2))
    bound = 5 * noise / math.sqrt(4080)
    stochastic = _ema_relative_bias(code_name, beta, steps, "stochastic")
    nearest = _ema_relative_bias(code_name, beta, steps, "nearest")
    assert abs(stochastic) <= bound, stochastic
    assert nearest < -3 * bound, nearest


# ------------------------------------------------------------------------------ the step


def test_one_step_equals_the_float64_formula_on_the_decoded_state():
    """θ after one step is the float64 formula applied to the decoded m and h; the new m
    decodes to within a code spacing of float64 m."""
    generator = torch.Generator().manual_seed(5)
    param, grad = torch.randn(3000, generator=generator), torch.randn(3000, generator=generator)
    m_codes, m_absmax = quantize(torch.randn(3000, generator=generator) * 0.05, SIGNED)
    h_codes, h_absmax = quantize(torch.rand(3000, generator=generator), UNSIGNED)
    m64 = dequantize(m_codes, m_absmax, SIGNED).double()
    h64 = dequantize(h_codes, h_absmax, UNSIGNED).double()
    m64 = HYPER["beta1"] * m64 + (1 - HYPER["beta1"]) * grad.double()
    ratio = (m64 / (HYPER["rho"] * h64).clamp(min=HYPER["eps"])).clamp(-1, 1)
    theta64 = param.double() * (1 - HYPER["lr"] * HYPER["weight_decay"]) - HYPER["lr"] * ratio
    sophia_update([param], [grad], [m_codes], [h_codes], **HYPER, foreach=False,
                  rounding_keys=[rounding_key(0, 1, M_STREAM)], exp_avg_absmaxes=[m_absmax],
                  hessian_absmaxes=[h_absmax])
    torch.testing.assert_close(param.double(), theta64, rtol=2e-6, atol=1e-7)
    absmax = _blocks_absmax(m64.numpy())
    low, high = _neighbours(m64.numpy() / absmax, TABLES["signed"])
    decoded = dequantize(m_codes, m_absmax, SIGNED).double().numpy()
    slack = 2.0**-21 * np.abs(m64.numpy())  # m, m / absmax and the decoding are float32
    assert np.all(np.abs(decoded - m64.numpy()) <= (high - low) * absmax + slack)


def test_the_refresh_folds_into_8bit_h_as_float64_says():
    generator = torch.Generator().manual_seed(6)
    codes, absmax = quantize(torch.rand(2000, generator=generator), UNSIGNED)
    grad = torch.randn(2000, generator=generator)
    expected = (0.99 * dequantize(codes, absmax, UNSIGNED).double()
                + 0.01 * 8.0 * grad.double() ** 2).numpy()
    gauss_newton_ema_update([codes], [grad], beta2=0.99, scale=8.0,
                            rounding_keys=[rounding_key(0, 1, 2)], absmaxes=[absmax])
    assert codes.dtype == U8 and absmax.dtype == torch.float32
    scale = _blocks_absmax(expected)
    low, high = _neighbours(expected / scale, TABLES["unsigned"])
    decoded = dequantize(codes, absmax, UNSIGNED).double().numpy()
    slack = 2.0**-21 * expected  # h, h / absmax and the decoding are float32
    assert np.all(np.abs(decoded - expected) <= (high - low) * scale + slack)
    with pytest.raises(ValueError, match="absmaxes"):
        gauss_newton_ema_update([codes], [grad], beta2=0.99, scale=8.0, rounding_keys=[1])
    with pytest.raises(ValueError, match="rounding_keys"):
        gauss_newton_ema_update([codes], [grad], beta2=0.99, scale=8.0, absmaxes=[absmax])


STATE_KEYS = ("exp_avg", "hessian", "exp_avg_absmax", "hessian_absmax")


def _assert_8bit_state(optimizer, param):
    state = optimizer.state[param]
    for key in ("exp_avg", "hessian"):
        assert state[key].dtype == U8 and state[key].shape == param.shape
        assert state[f"{key}_absmax"].dtype == torch.float32
        assert state[f"{key}_absmax"].shape == (-(-param.numel() // 256),)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_for_loop_and_foreach_are_bitwise_equal(dtype, maximize):
    """Two groups, 25 steps, refreshes every 5: parameters, codes and absmaxes agree bit for
    bit, and the state keeps its dtypes and shapes throughout. (For float16 parameters the
    foreach path rounds θ differently whatever the state, as with float32 state.)"""
    runs = []
    for foreach in (False, True):
        model = _model(0, dtype)
        optimizer = SophiaG(_groups(model), lr=1e-2, refresh_every=5, maximize=maximize,
                            state_dtype=U8, foreach=foreach)
        _train(model, optimizer, range(25), dtype)
        assert optimizer.refreshes_done() == 4  # after steps 5, 10, 15, 20
        runs.append((model, optimizer))
    (reference, reference_opt), (model, optimizer) = runs
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
        _assert_8bit_state(optimizer, q)
        for key in STATE_KEYS:
            assert torch.equal(reference_opt.state[p][key], optimizer.state[q][key])


def test_float16_parameters_step_with_8bit_state():
    model = _model(1, torch.float16)
    optimizer = SophiaG(model.parameters(), lr=1e-2, refresh_every=3, state_dtype=U8)
    start = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, range(7), torch.float16)
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert p.dtype == torch.float16 and p.isfinite().all() and not torch.equal(p, p0)
        _assert_8bit_state(optimizer, p)


# ------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resume_from_a_checkpoint_is_bitwise_the_uninterrupted_run(dtype):
    make = lambda model: SophiaG(model.parameters(), lr=1e-2, refresh_every=4,  # noqa: E731
                                 state_dtype=U8)
    model = _model(2, dtype)
    optimizer = make(model)
    _train(model, optimizer, range(10), dtype)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _train(model, optimizer, range(10, 22), dtype)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = _model(77, dtype)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(checkpoint["optimizer"])
    for p in resumed_model.parameters():
        _assert_8bit_state(resumed, p)
    _train(resumed_model, resumed, range(10, 22), dtype)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in STATE_KEYS + ("step", "hessian_step"):
            assert torch.equal(optimizer.state[p][key], resumed.state[q][key])


@pytest.mark.parametrize("source", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_float_state_loads_into_8bit_state_to_nearest(source):
    """float32 (or bf16) m and h loaded into an 8-bit optimizer: each block's absmax is its
    largest |value| and each value decodes to within half a code spacing; it steps on."""
    model = _model(3, torch.float32)
    other = SophiaG(model.parameters(), lr=1e-2, refresh_every=3, state_dtype=source)
    _train(model, other, range(7), torch.float32)
    eight_bit = SophiaG(model.parameters(), lr=1e-2, refresh_every=3, state_dtype=U8)
    eight_bit.load_state_dict(copy.deepcopy(other.state_dict()))
    for p in model.parameters():
        _assert_8bit_state(eight_bit, p)
        for key, name in (("exp_avg", "signed"), ("hessian", "unsigned")):
            x64 = other.state[p][key].double().reshape(-1).numpy()
            absmax = _blocks_absmax(x64)
            assert np.array_equal(eight_bit.state[p][f"{key}_absmax"].double().numpy(),
                                  absmax[::256])
            low, high = _neighbours(np.divide(x64, absmax, out=np.zeros_like(x64),
                                              where=absmax > 0), TABLES[name])
            code = CODES[name]
            decoded = dequantize(eight_bit.state[p][key], eight_bit.state[p][f"{key}_absmax"],
                                 code).double().reshape(-1).numpy()
            assert np.all(np.abs(decoded - x64)
                          <= 0.5 * (high - low) * absmax * (1 + 1e-5) + 1e-12)
        assert torch.equal(eight_bit.state[p]["step"], other.state[p]["step"])
    assert eight_bit.refreshes_done() == 2
    _train(model, eight_bit, range(7, 10), torch.float32)


@pytest.mark.parametrize("target", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_8bit_state_loads_into_a_float_state_decoded(target):
    """8-bit state loaded into a float32 (or bf16) optimizer: m and h are code value × absmax
    (from the test's own decoding of the bit patterns), and the absmax keys are gone."""
    model = _model(4, torch.float32)
    eight_bit = SophiaG(model.parameters(), lr=1e-2, refresh_every=3, state_dtype=U8)
    _train(model, eight_bit, range(7), torch.float32)
    other = SophiaG(model.parameters(), lr=1e-2, refresh_every=3, state_dtype=target)
    other.load_state_dict(copy.deepcopy(eight_bit.state_dict()))
    sorted_values = {"exp_avg": TABLES["signed"], "hessian": TABLES["unsigned"]}
    for p in model.parameters():
        state = other.state[p]
        assert not {"exp_avg_absmax", "hessian_absmax"} & set(state)
        for key in ("exp_avg", "hessian"):
            codes = eight_bit.state[p][key].reshape(-1).long().numpy()
            absmax = np.repeat(eight_bit.state[p][f"{key}_absmax"].numpy(), 256)[:codes.size]
            expected = torch.from_numpy(
                (sorted_values[key][codes].astype(np.float32) * absmax).astype(np.float32))
            assert state[key].dtype == (target or torch.float32)
            assert torch.equal(state[key].reshape(-1), expected.to(state[key].dtype))
    _train(model, other, range(7, 9), torch.float32)


def test_a_loaded_8bit_state_without_its_absmax_is_refused():
    model = _model(5, torch.float32)
    optimizer = SophiaG(model.parameters(), lr=1e-2, state_dtype=U8)
    _train(model, optimizer, range(2), torch.float32)
    saved = copy.deepcopy(optimizer.state_dict())
    del saved["state"][0]["hessian_absmax"]
    fresh = SophiaG(model.parameters(), lr=1e-2, state_dtype=U8)
    with pytest.raises(ValueError, match="hessian_absmax"):
        fresh.load_state_dict(saved)


def test_a_deep_copy_or_pickle_keeps_the_state_and_steps_alike():
    model = _model(9, torch.float32)
    optimizer = SophiaG(model.parameters(), lr=1e-2, refresh_every=2, state_dtype=U8)
    _train(model, optimizer, range(3), torch.float32)
    clones = [copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for clone in clones:
        assert clone.state_dtype == U8
        for q in clone.param_groups[0]["params"]:
            q.grad = torch.ones_like(q)
        clone.step()
        for p, q in zip(optimizer.param_groups[0]["params"], clone.param_groups[0]["params"],
                        strict=True):
            _assert_8bit_state(clone, q)
            assert torch.equal(p, q)
            for key in STATE_KEYS:
                assert torch.equal(optimizer.state[p][key], clone.state[q][key])


def test_state_bytes_are_about_a_quarter():
    model = _model(6, torch.float32)
    optimizers = [SophiaG(model.parameters(), state_dtype=s) for s in (None, U8)]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    sizes = []
    for optimizer in optimizers:
        optimizer.step()
        sizes.append(sum(t.numel() * t.element_size() for s in optimizer.state.values()
                         for k, t in s.items() if k in STATE_KEYS))
    numels = [p.numel() for p in model.parameters()]
    assert sizes[0] == 8 * sum(numels)
    assert sizes[1] == sum(2 * n + 8 * -(-n // 256) for n in numels)


# ------------------------------------------------------------------------------ the rest


def test_unclipped_fraction_counts_on_the_decoded_state():
    model = _model(7, torch.float32)
    rho = 3.0  # large enough that some coordinates are unclipped
    optimizer = SophiaG(model.parameters(), lr=1e-2, rho=rho, refresh_every=2, state_dtype=U8)
    _train(model, optimizer, range(6), torch.float32)
    total = unclipped = 0
    for p in model.parameters():
        state = optimizer.state[p]
        m = dequantize(state["exp_avg"], state["exp_avg_absmax"], SIGNED)
        h = dequantize(state["hessian"], state["hessian_absmax"], UNSIGNED)
        unclipped += int((m.abs() < rho * h).sum())
        total += p.numel()
    assert 0 < unclipped < total
    assert optimizer.unclipped_fraction() == unclipped / total
    state = optimizer.state[next(model.parameters())]
    with pytest.raises(TypeError, match="decode 8-bit state first"):
        sophia_pytorch.functional.unclipped_count(state["exp_avg"], state["hessian"], rho)


def test_what_8bit_state_cannot_serve_is_refused_with_the_fix():
    param = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="fused=False"):
        SophiaG([param], state_dtype=U8, fused=True)
    with pytest.raises(ValueError, match="SophiaH.*negative.*bfloat16"):
        SophiaH([param], state_dtype=U8)
    with pytest.raises(ValueError, match="float64"):
        SophiaG([torch.zeros(3, dtype=torch.float64, requires_grad=True)], state_dtype=U8)
    for bad in (torch.int8, torch.float16, "uint8"):
        with pytest.raises(ValueError, match="state_dtype"):
            SophiaG([param], state_dtype=bad)
    m, h = quantize(torch.zeros(3), SIGNED), quantize(torch.zeros(3), UNSIGNED)
    with pytest.raises(ValueError, match="fused kernel does not step 8-bit"):
        sophia_update([param.detach()], [torch.ones(3)], [m[0]], [h[0]], **HYPER, fused=True,
                      rounding_keys=[1], exp_avg_absmaxes=[m[1]], hessian_absmaxes=[h[1]])


def test_the_default_path_steps_8bit_state_where_the_fused_kernel_would_run():
    """fused=None takes the fused kernel for CPU parameters; with 8-bit state it steps on the
    for-loop instead, bitwise as foreach=False does."""
    runs = []
    for options in (dict(), dict(foreach=False, fused=False)):
        model = _model(8, torch.float32)
        optimizer = SophiaG(model.parameters(), lr=1e-2, refresh_every=3, state_dtype=U8,
                            **options)
        _train(model, optimizer, range(5), torch.float32)
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(p, q)


def _fsdp2_refusal(rank: int, world_size: int) -> str:
    from torch.distributed.fsdp import fully_shard

    model = _model(8, torch.float32)
    fully_shard(model)
    try:
        SophiaG(model.parameters(), state_dtype=U8)
    except ValueError as error:
        return str(error)
    return "constructed"


def test_fsdp2_parameters_are_refused(tmp_path):
    from tests._multiprocess import run_on_ranks

    for message in run_on_ranks(_fsdp2_refusal, tmp_path):
        assert "does not support DTensor" in message and "bfloat16" in message


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compiled_step_keeps_8bit_state_and_tracks_eager():
    """torch.compile(optimizer.step): the quantization runs eagerly (a graph break), the state
    stays 8-bit and the parameters follow the eager run to float32 rounding."""
    models = [_model(6, torch.float32) for _ in range(2)]
    optimizers = [SophiaG(m.parameters(), lr=1e-2, refresh_every=2, state_dtype=U8)
                  for m in models]
    steps = [optimizers[0].step, torch.compile(optimizers[1].step)]
    for t in range(3):
        for model, optimizer, step in zip(models, optimizers, steps, strict=True):
            if optimizer.hessian_due():
                optimizer.zero_grad()
                loss, n = sophia_pytorch.sampled_cross_entropy(
                    model(_batch(t, torch.float32)[0]), generator=torch.Generator().manual_seed(t))
                loss.backward()
                optimizer.update_hessian(scale=n)
            optimizer.zero_grad()
            inputs, targets = _batch(t, torch.float32)
            F.cross_entropy(model(inputs), targets).backward()
            step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        _assert_8bit_state(optimizers[1], q)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
