"""bfloat16 optimizer state (``state_dtype=torch.bfloat16``): stochastic rounding, paths,
checkpoints.

The rounding is checked against float64 (it is unbiased; its two outcomes are the bf16
neighbours of the value), the hash against an independent NumPy uint32 transcription, and the
decision to round m stochastically rather than to nearest against a float64 EMA.
"""

from __future__ import annotations

import copy
import io
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sophia_pytorch
from sophia_pytorch import SophiaG, SophiaH
from sophia_pytorch._rounding import (
    H_STREAM,
    M_STREAM,
    hash32_int,
    rounding_key,
    stochastic_round_bf16,
)
from sophia_pytorch.functional import (
    _single_tensor_sophia,
    fused_kernel_available,
    gauss_newton_ema_update,
)
from tests.optim.state_model import small_batch as _batch
from tests.optim.state_model import small_model as _model
from tests.optim.state_model import train as _train
from tests.optim.state_model import two_groups as _groups

BF16 = torch.bfloat16
HYPER = dict(lr=3e-3, beta1=0.965, rho=0.04, weight_decay=0.1, eps=1e-15)


def _numpy_hash32(x: np.ndarray) -> np.ndarray:
    """The hash in NumPy uint32 arithmetic, which wraps modulo 2³² as C's does."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x21F0AAAD)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x735A2D97)
        x ^= x >> np.uint32(15)
    return x


def _bf16_neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(toward zero, away from zero): the two bf16 values around float32 ``x``, in float64."""
    bits = x.astype(np.float32).view(np.uint32)
    low = bits & np.uint32(0xFFFF0000)
    exact = low == bits
    high = np.where(exact, low, low + np.uint32(0x10000))
    as_f64 = lambda b: b.astype(np.uint32).view(np.float32).astype(np.float64)  # noqa: E731
    return as_f64(low), as_f64(high)


# ------------------------------------------------------------------------- the rounding


def test_hash_equals_an_independent_uint32_transcription():
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 2**32, (2000,), generator=generator, dtype=torch.int64)
    values[:4] = torch.tensor([0, 1, 2**31, 2**32 - 1])
    expected = _numpy_hash32(values.numpy()).astype(np.int64).tolist()
    assert [hash32_int(int(v)) for v in values] == expected


def test_rounding_bits_are_the_top_half_of_index_xor_key_times_the_multiplier():
    """The documented rule, in NumPy uint32: x = 1 + 2⁻⁸ lies halfway between the bf16 values
    1 and 1 + 2⁻⁷ (its low 16 bits are 0x8000), so it rounds up exactly when r ≥ 2¹⁵."""
    key = rounding_key(3, 5, M_STREAM)
    x = torch.full((1000,), 1.0 + 2.0**-8)
    index = np.arange(1000, dtype=np.uint32)
    with np.errstate(over="ignore"):
        noise = ((index ^ np.uint32(key)) * np.uint32(0x21F0AAAD)) >> np.uint32(16)
    up = stochastic_round_bf16(x, key).float() > 1.0
    assert np.array_equal(up.numpy(), noise >= 0x8000)


def test_keys_differ_by_seed_counter_and_stream():
    keys = {rounding_key(seed, counter, stream) for seed in range(20) for counter in range(20)
            for stream in (M_STREAM, H_STREAM)}
    assert len(keys) == 20 * 20 * 2
    assert all(0 <= k < 2**32 for k in keys)


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    """Each of 2000 values rounded under 4096 keys: every outcome is one of its two bf16
    neighbours, and the mean is the value within 5 standard errors, p(1−p)(hi−lo)²/N being
    the variance of the mean of N roundings that go up with probability p. Round-to-nearest,
    put to the same test, fails it: the test can tell a biased rounding."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2000, generator=generator) * torch.exp2(
        torch.randint(-40, 40, (2000,), generator=generator).float())
    keys = 4096
    rounded = torch.stack([stochastic_round_bf16(x, rounding_key(7, k, M_STREAM))
                           for k in range(keys)]).double().numpy()
    value = x.double().numpy()
    low, high = _bf16_neighbours(x.numpy())
    assert np.all((rounded == low) | (rounded == high))
    spread = high - low
    p = np.divide(np.abs(value - low), np.abs(spread), out=np.zeros_like(value),
                  where=spread != 0)
    bound = 5 * np.sqrt(p * (1 - p) / keys) * np.abs(spread) + 1e-300
    assert np.all(np.abs(rounded.mean(axis=0) - value) <= bound)
    nearest = x.to(BF16).double().numpy()
    assert np.mean(np.abs(nearest - value) > bound) > 0.9


def test_stochastic_rounding_keeps_bf16_values_and_special_values():
    bf16_exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, 1e-40, float("inf"),
                               -float("inf")]).to(BF16).float()
    for key in (0, 1, 2**32 - 1):
        out = stochastic_round_bf16(bf16_exact, key)
        assert torch.equal(out.view(torch.int16), bf16_exact.to(BF16).view(torch.int16))
        assert stochastic_round_bf16(torch.tensor([float("nan"), -float("nan")]), key).isnan().all()


def test_stochastic_rounding_draws_by_memory_offset_so_layouts_agree():
    """A channels-last tensor rounds as its memory, read in order, does: the fused kernel walks
    memory, so this is what keeps the paths equal for any dense layout."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    flat = x.permute(0, 2, 3, 1).reshape(-1)  # memory order
    out = stochastic_round_bf16(x, 99)
    assert torch.equal(out.permute(0, 2, 3, 1).reshape(-1), stochastic_round_bf16(flat, 99))


def _ema_relative_bias(rounding: str, beta: float, steps: int, every: int = 1) -> float:
    """The signed mean over 4096 coordinates of (m − m64)/m64 after ``steps`` EMA updates
    m ← β·m + (1 − β)·x of constant positive x spread over 12 octaves, m64 in float64 and m
    stored in bf16 (computed in float32) by ``rounding``. ``every`` spaces the update keys
    as refreshes are spaced (h)."""
    generator = torch.Generator().manual_seed(2)
    target = torch.exp2(torch.rand(4096, generator=generator, dtype=torch.float64) * 12 - 6)
    exact = torch.zeros_like(target)
    stored = torch.zeros(4096, dtype=BF16)
    for t in range(1, steps + 1):
        exact = beta * exact + (1 - beta) * target
        value = stored.float().mul_(beta).add_(target.float(), alpha=1 - beta)
        stored = (stochastic_round_bf16(value, rounding_key(0, t * every, M_STREAM))
                  if rounding == "stochastic" else value.to(BF16))
    return float(((stored.double() - exact) / exact).mean())


@pytest.mark.parametrize(("state", "beta"), [("m", 0.965), ("h", 0.99)])
def test_round_to_nearest_biases_the_ema_and_stochastic_rounding_does_not(state, beta):
    """The decision to round m (and h) stochastically, in float64. With round-to-nearest an
    EMA stalls once (1 − β)·|x − m| falls below half of bf16's spacing: m stays short of x by
    up to 2⁻⁸/(1 − β) of itself (11% for m, 39% for h) — a systematic error. Stochastic
    rounding's error is noise: per coordinate its standard deviation is at most
    2⁻⁸/(2·√(1 − β²)) of the value (spacing ≤ 2⁻⁷ relative, variance ≤ spacing²/4 per update,
    damped by the EMA), so the mean over 4096 coordinates is within 5/√4096 of that."""
    steps = int(30 / (1 - beta))  # long past the EMA's memory: m64 is x to 1e-13
    noise = 2.0**-8 / (2 * math.sqrt(1 - beta**2))
    bound = 5 * noise / math.sqrt(4096)
    stochastic = _ema_relative_bias("stochastic", beta, steps)
    nearest = _ema_relative_bias("nearest", beta, steps)
    assert abs(stochastic) <= bound
    assert nearest < -10 * bound, (state, nearest)


# ------------------------------------------------------------------------ the step


def test_one_step_equals_the_float64_formula_on_the_widened_state():
    """θ after one step equals the float64 formula applied to the bf16 state widened (to
    float32 rounding), and the stored m is one of the two bf16 neighbours of float64 m."""
    generator = torch.Generator().manual_seed(3)
    param = torch.randn(5000, generator=generator)
    grad = torch.randn(5000, generator=generator)
    exp_avg = (torch.randn(5000, generator=generator) * 0.05).to(BF16)
    hessian = torch.rand(5000, generator=generator).to(BF16)
    theta64, m64, h64 = param.double(), exp_avg.double(), hessian.double()
    m64 = HYPER["beta1"] * m64 + (1 - HYPER["beta1"]) * grad.double()
    ratio = (m64 / (HYPER["rho"] * h64).clamp(min=HYPER["eps"])).clamp(-1, 1)
    theta64 = theta64 * (1 - HYPER["lr"] * HYPER["weight_decay"]) - HYPER["lr"] * ratio
    _single_tensor_sophia([param], [grad], [exp_avg], [hessian], **HYPER, maximize=False,
                          rounding_keys=[rounding_key(0, 1, M_STREAM)])
    assert exp_avg.dtype == BF16 and hessian.dtype == BF16
    torch.testing.assert_close(param.double(), theta64, rtol=2e-6, atol=1e-7)
    low, high = _bf16_neighbours(m64.float().numpy())
    stored = exp_avg.double().numpy()  # m is computed in float32: allow its rounding too
    exact = m64.numpy()
    assert np.all(np.abs(stored - exact) <= np.abs(high - low) + np.abs(exact) * 2.0**-23)


def test_the_refresh_folds_into_bf16_h_as_float64_says():
    generator = torch.Generator().manual_seed(4)
    hessian = torch.rand(4000, generator=generator).to(BF16)
    grad = torch.randn(4000, generator=generator)
    expected = 0.99 * hessian.double() + 0.01 * 8.0 * grad.double() ** 2
    gauss_newton_ema_update([hessian], [grad], beta2=0.99, scale=8.0,
                            rounding_keys=[rounding_key(0, 1, H_STREAM)])
    assert hessian.dtype == BF16
    low, high = _bf16_neighbours(expected.float().numpy())
    stored = hessian.double().numpy()
    assert np.all((stored == low) | (stored == high))
    with pytest.raises(ValueError, match="rounding_keys"):
        gauss_newton_ema_update([hessian], [grad], beta2=0.99, scale=8.0)


PATHS = {"for-loop": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False),
         "fused": dict(fused=True)}


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["SophiaG", "SophiaH"])
def test_for_loop_foreach_and_fused_are_bitwise_equal(name, dtype, maximize):
    """Two groups, 25 steps, refreshes every 5: parameters and bf16 m and h agree bit for bit
    on every path (the fused kernel hashes exactly as torch's integer ops do). For float16
    parameters the foreach path rounds θ differently from the for-loop whatever the state
    (as it does with float32 state), so there the fused path is held to the for-loop only."""
    if not fused_kernel_available():
        pytest.skip("fused kernel unavailable")
    cls = SophiaG if name == "SophiaG" else SophiaH
    runs = []
    for label, path in PATHS.items():
        if dtype == torch.float16 and label == "foreach":
            continue
        model = _model(0, dtype)
        optimizer = cls(_groups(model), lr=1e-2, refresh_every=5, maximize=maximize,
                        state_dtype=BF16, **path)
        _train(model, optimizer, range(25), dtype, hutchinson=name == "SophiaH")
        runs.append((model, optimizer))
    (reference, reference_opt), *others = runs
    for model, optimizer in others:
        for p, q in zip(reference.parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q)
            for key in ("exp_avg", "hessian"):
                assert optimizer.state[q][key].dtype == BF16
                assert torch.equal(reference_opt.state[p][key], optimizer.state[q][key])


def test_fused_is_bitwise_equal_above_the_parallel_threshold():
    """300 007 elements: the kernel's threads share chunks; the hash index is global."""
    if not fused_kernel_available():
        pytest.skip("fused kernel unavailable")
    generator = torch.Generator().manual_seed(5)
    tensors = [torch.randn(300_007, generator=generator) for _ in range(2)]
    states = [(torch.randn(300_007, generator=generator) * 0.05).to(BF16),
              torch.rand(300_007, generator=generator).to(BF16)]
    results = []
    for path in PATHS.values():
        param, grad = (t.clone() for t in tensors)
        exp_avg, hessian = (s.clone() for s in states)
        sophia_pytorch.functional.sophia_update(
            [param], [grad], [exp_avg], [hessian], **HYPER, rounding_keys=[12345], **path)
        results.append((param, exp_avg))
    for param, exp_avg in results[1:]:
        assert torch.equal(param, results[0][0]) and torch.equal(exp_avg, results[0][1])


@pytest.mark.parametrize(("state_dtype", "share"), [(BF16, 0.02), (torch.uint8, 0.05)],
                         ids=["bf16", "8bit"])
def test_narrow_state_trajectory_stays_close_to_float32_state(state_dtype, share):
    """300 full-batch steps on a teacher's labels: at every 25th step the bf16-state (8-bit)
    loss is within 2% (5%) of what the float32-state run has shed by then."""
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(512, 12, generator=generator)
    targets = (inputs @ torch.randn(12, 5, generator=generator)).argmax(dim=1)
    curves = []
    for dtype in (None, state_dtype):
        model = _model(1, torch.float32)
        optimizer = SophiaG(model.parameters(), lr=1e-2, refresh_every=5, state_dtype=dtype)
        curve = []
        for t in range(301):
            if t % 25 == 0:
                with torch.no_grad():
                    curve.append(float(F.cross_entropy(model(inputs), targets)))
            if optimizer.hessian_due():
                optimizer.zero_grad()
                sampled, n = sophia_pytorch.sampled_cross_entropy(
                    model(inputs), generator=torch.Generator().manual_seed(t))
                sampled.backward()
                optimizer.update_hessian(scale=n)
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
        curves.append(torch.tensor(curve, dtype=torch.float64))
    fp32, narrow = curves
    assert fp32[-1] < 0.5 * fp32[0]  # it learned
    shed = fp32[0] - fp32
    assert torch.all((narrow - fp32).abs()[1:] <= share * shed[1:])


# ------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["SophiaG", "SophiaH"])
def test_resume_from_a_checkpoint_is_bitwise_the_uninterrupted_run(name, dtype):
    cls = SophiaG if name == "SophiaG" else SophiaH
    hutchinson = name == "SophiaH"
    make = lambda model: cls(model.parameters(), lr=1e-2, refresh_every=4,  # noqa: E731
                             state_dtype=BF16)
    model = _model(2, dtype)
    optimizer = make(model)
    _train(model, optimizer, range(10), dtype, hutchinson=hutchinson)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _train(model, optimizer, range(10, 22), dtype, hutchinson=hutchinson)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = _model(77, dtype)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(checkpoint["optimizer"])
    for p in resumed_model.parameters():
        assert resumed.state[p]["exp_avg"].dtype == BF16 == resumed.state[p]["hessian"].dtype
    _train(resumed_model, resumed, range(10, 22), dtype, hutchinson=hutchinson)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "hessian", "step", "hessian_step"):
            assert torch.equal(optimizer.state[p][key], resumed.state[q][key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_float32_state_loads_into_bf16_state_and_back(dtype):
    """A float32 state loaded into a bf16-state optimizer is rounded to nearest into bf16 (and
    steps on); a bf16 state loaded into a float32-state optimizer widens exactly."""
    model = _model(3, dtype)
    fp32 = SophiaG(model.parameters(), lr=1e-2, refresh_every=3)
    _train(model, fp32, range(7), dtype)
    saved = copy.deepcopy(fp32.state_dict())

    bf16 = SophiaG(model.parameters(), lr=1e-2, refresh_every=3, state_dtype=BF16)
    bf16.load_state_dict(saved)
    for p in model.parameters():
        for key in ("exp_avg", "hessian"):
            assert bf16.state[p][key].dtype == BF16
            assert torch.equal(bf16.state[p][key], fp32.state[p][key].to(BF16))
        assert torch.equal(bf16.state[p]["step"], fp32.state[p]["step"])
    _train(model, bf16, range(7, 10), dtype)

    back = SophiaG(model.parameters(), lr=1e-2, refresh_every=3)
    back.load_state_dict(copy.deepcopy(bf16.state_dict()))
    for p in model.parameters():
        for key in ("exp_avg", "hessian"):
            assert back.state[p][key].dtype == torch.float32
            assert torch.equal(back.state[p][key], bf16.state[p][key].float())
    assert back.refreshes_done() == bf16.refreshes_done() == 3


def test_state_bytes_are_halved():
    model = _model(4, torch.float32)
    optimizers = [SophiaG(model.parameters(), state_dtype=s) for s in (None, BF16)]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    sizes = []
    for optimizer in optimizers:
        optimizer.step()
        sizes.append(sum(t.numel() * t.element_size() for s in optimizer.state.values()
                         for k, t in s.items() if k in ("exp_avg", "hessian")))
    assert sizes[1] * 2 == sizes[0]


# ----------------------------------------------------------------------- the rest


def test_invalid_state_dtypes_and_parameters_are_refused():
    param = torch.zeros(3, requires_grad=True)
    for bad in (torch.float16, torch.float32, "bfloat16"):
        with pytest.raises(ValueError, match="state_dtype"):
            SophiaG([param], state_dtype=bad)
    with pytest.raises(ValueError, match="float64"):
        SophiaG([torch.zeros(3, dtype=torch.float64, requires_grad=True)], state_dtype=BF16)
    optimizer = SophiaG([param], state_dtype=BF16)
    with pytest.raises(ValueError, match="complex64"):
        optimizer.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64)]})
    assert len(optimizer.param_groups) == 1


def test_unclipped_fraction_counts_in_float32():
    model = _model(5, torch.float32)
    optimizer = SophiaG(model.parameters(), lr=1e-2, refresh_every=2, state_dtype=BF16)
    _train(model, optimizer, range(6), torch.float32)
    total = unclipped = 0
    for p in model.parameters():
        state = optimizer.state[p]
        unclipped += int((state["exp_avg"].float().abs() < 0.04 * state["hessian"].float()).sum())
        total += p.numel()
    assert optimizer.unclipped_fraction() == unclipped / total


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compiled_step_keeps_bf16_state_and_tracks_eager():
    """torch.compile(optimizer.step): the state stays bf16 and the parameters follow the eager
    run to float32 rounding (inductor may reorder; the rounding keys are the same)."""
    models = [_model(6, torch.float32) for _ in range(2)]
    optimizers = [SophiaG(m.parameters(), lr=1e-2, refresh_every=2, state_dtype=BF16)
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
        assert optimizers[1].state[q]["exp_avg"].dtype == BF16
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizers[0].state[p]["exp_avg"].float(),
                                   optimizers[1].state[q]["exp_avg"].float(),
                                   rtol=2**-7, atol=1e-8)


# ----------------------------------------------------------------------- distributed


def _distributed_bf16_run(rank: int, world_size: int, mode: str) -> dict:
    """6 steps on this rank's half of each batch under DDP or FSDP2, bf16 state, refreshes
    after steps 2, 4, 6; the full parameters and state at the end."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model = _model(8, torch.float32)
    if mode == "fsdp2":
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        forward = model
    else:
        forward = DistributedDataParallel(model)
    optimizer = SophiaG(forward.parameters(), lr=1e-2, refresh_every=2, state_dtype=BF16)
    for t in range(6):
        inputs, targets = _batch(t, torch.float32)
        mine = slice(rank * 32, (rank + 1) * 32)
        F.cross_entropy(forward(inputs[mine]), targets[mine]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if optimizer.hessian_due():
            sampled, n = sophia_pytorch.sampled_cross_entropy(
                forward(inputs[mine]), generator=torch.Generator().manual_seed(100 * t + rank))
            sampled.backward()
            total = torch.tensor(n)
            dist.all_reduce(total)
            optimizer.update_hessian(scale=int(total))
            optimizer.zero_grad(set_to_none=True)
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()  # noqa: E731
    named = list(model.named_parameters())
    return {"params": {n: full(p) for n, p in named},
            "state": {n: {k: full(optimizer.state[p][k]) for k in ("exp_avg", "hessian")}
                      for n, p in named},
            "unclipped": optimizer.unclipped_fraction()}


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_bf16_state_under_ddp_and_fsdp2_keeps_the_ranks_alike(mode, tmp_path):
    """Under DDP the replicas round alike (the seed is the parameter's index, not the rank), so
    they stay bitwise equal; under FSDP2 each rank rounds its shard and the gathered
    parameters and bf16 state are one model. Both stay bf16 and move from their start."""
    from tests._multiprocess import run_on_ranks

    if mode == "fsdp2":
        fused_kernel_available()  # built before forking
    runs = run_on_ranks(_distributed_bf16_run, tmp_path, mode)
    start = dict(_model(8, torch.float32).named_parameters())
    for run in runs[1:]:
        for name, value in runs[0]["params"].items():
            assert torch.equal(run["params"][name], value)
            for key in ("exp_avg", "hessian"):
                assert run["state"][name][key].dtype == BF16
                assert torch.equal(run["state"][name][key], runs[0]["state"][name][key])
        assert run["unclipped"] == runs[0]["unclipped"]
    assert all(not torch.equal(runs[0]["params"][n], p) for n, p in start.items())
    assert any(bool(s["hessian"].any()) for s in runs[0]["state"].values())


def test_a_deep_copy_or_pickle_keeps_the_state_dtype_and_steps_alike():
    import pickle

    model = _model(9, torch.float32)
    optimizer = SophiaG(model.parameters(), lr=1e-2, refresh_every=2, state_dtype=BF16)
    _train(model, optimizer, range(3), torch.float32)
    for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert clone.state_dtype == BF16
        assert all(s["exp_avg"].dtype == BF16 for s in clone.state.values())
        for p in clone.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        clone.step()  # rounds: needs its state_dtype to make the keys


def test_bias_corrected_first_refresh_sets_bf16_h_to_a_neighbour_of_the_estimate():
    """With bias_correction the first estimate replaces h (weight 1): the bf16 h is one of
    the two bf16 neighbours of B·g⊙g, computed in float64."""
    param = torch.zeros(3000, requires_grad=True)
    param.grad = torch.randn(3000, generator=torch.Generator().manual_seed(10))
    optimizer = SophiaG([param], bias_correction=True, state_dtype=BF16)
    assert optimizer.update_hessian(scale=16.0)
    expected = (16.0 * param.grad.double() ** 2).float().numpy()
    low, high = _bf16_neighbours(expected)
    stored = optimizer.state[param]["hessian"].double().numpy()
    exact = expected.astype(np.float64)
    # ĥ is computed in float32: allow its rounding too
    assert np.all(np.abs(stored - exact) <= (high - low) + exact * 2.0**-23)
    assert np.mean((stored == low) | (stored == high)) > 0.99
