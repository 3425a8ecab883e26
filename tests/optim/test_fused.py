"""The fused CPU step: bitwise equal to the for-loop, close to float64, and optional.

The kernel is compiled once per machine (about 20 s here) and cached; tests that need it skip
where it cannot be built, and the fallback tests simulate that case on any machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import sophia_pytorch._kernel.loader as fused
from sophia_pytorch import SophiaG
from sophia_pytorch.functional import (
    _multi_tensor_sophia,
    _single_tensor_sophia,
    fused_kernel_available,
    sophia_update,
)

HYPER = dict(lr=3e-3, beta1=0.965, rho=0.04, weight_decay=0.1, eps=1e-15)
# Sizes around the 8-lane vector width, and one above the size at which the kernel goes
# parallel (131072 elements in all).
SIZES = [1, 7, 8, 9, 33, 300_007]
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "bfloat16": (torch.bfloat16, torch.float32),
    "float16": (torch.float16, torch.float32),
    "complex64": (torch.complex64, torch.complex64),
}


@pytest.fixture(scope="session")
def kernel() -> None:
    if not fused_kernel_available():
        pytest.skip(f"fused kernel unavailable: {fused.unavailable_reason()}")


@pytest.fixture
def no_kernel(monkeypatch):
    """The process as it is on a machine where the build failed."""
    monkeypatch.setattr(fused, "_tried", True)
    monkeypatch.setattr(fused, "_op", None)
    monkeypatch.setattr(fused, "_failure", "RuntimeError: no C++ compiler (simulated)")
    monkeypatch.setattr(fused, "_warned", False)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, with every NaN made one: -0.0 differs from +0.0, any NaN equals any NaN.

    Which NaN an operation returns (sign, payload) depends on operand order inside a vector
    instruction; IEEE 754 leaves it unspecified, and torch's own paths differ in it.
    """
    tensor = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    tensor = torch.where(tensor.isnan(), torch.full_like(tensor, float("nan")), tensor)
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[
        tensor.element_size()])


def _inputs(size, dtype, state_dtype, *, seed=0, special=False):
    """θ, g, m, h with h of both signs and zeros, |m/(ρh)| on both sides of 1."""
    generator = torch.Generator().manual_seed(seed)

    def draw(scale, dtype):
        return (torch.randn(size, generator=generator, dtype=torch.float64) * scale).to(dtype)

    param, grad = draw(1.0, dtype), draw(1.0, dtype)
    exp_avg = draw(0.05, state_dtype)
    hessian = draw(1.0, state_dtype).abs() if not state_dtype.is_complex else draw(1.0, state_dtype)
    hessian[::5] *= -1
    hessian[::7] = 0
    if special and size >= 9:
        grad[0], exp_avg[1], hessian[2] = float("nan"), float("inf"), float("nan")
        hessian[3], exp_avg[4], hessian[4] = float("inf"), float("inf"), float("inf")
        exp_avg[5], hessian[5], param[6] = -0.0, -0.0, -0.0
    return param, grad, exp_avg, hessian


def _clone(tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_fused_step_is_bitwise_equal_to_the_for_loop(kernel, dtype_name, size, maximize,
                                                     weight_decay):
    dtype, state_dtype = DTYPES[dtype_name]
    inputs = _inputs(size, dtype, state_dtype, special=True)
    expected, actual = _clone(inputs), _clone(inputs)
    hyper = dict(HYPER, weight_decay=weight_decay, maximize=maximize)
    _single_tensor_sophia(*[[t] for t in expected], **hyper)
    left = fused.fused_sophia_(*[[t] for t in actual], **hyper)
    assert left == []
    for want, got in zip(expected, actual, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("eps", [0.0, 1e-15, 1e-3])
def test_fused_step_is_bitwise_equal_for_any_eps_including_zero(kernel, eps):
    inputs = _inputs(1000, torch.float32, torch.float32, seed=1, special=True)
    expected, actual = _clone(inputs), _clone(inputs)
    _single_tensor_sophia(*[[t] for t in expected], **dict(HYPER, eps=eps), maximize=False)
    fused.fused_sophia_(*[[t] for t in actual], **dict(HYPER, eps=eps), maximize=False)
    for want, got in zip(expected, actual, strict=True):
        assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_step_matches_the_update_rule_computed_in_float64(kernel, dtype):
    """θ and m after one step, against the rule written out here in float64."""
    param, grad, exp_avg, hessian = _inputs(50_000, dtype, dtype, seed=2)
    theta64, g64, m64, h64 = (t.to(torch.float64) for t in (param, grad, exp_avg, hessian))
    exp_avg_before = m64.clone()
    lr, beta1, rho, wd, eps = (HYPER[k] for k in ("lr", "beta1", "rho", "weight_decay", "eps"))
    m64 = beta1 * m64 + (1 - beta1) * g64
    theta64 = theta64 * (1 - lr * wd) - lr * torch.clamp(
        m64 / torch.clamp(rho * h64, min=eps), -1, 1)

    fused.fused_sophia_([param], [grad], [exp_avg], [hessian], **HYPER, maximize=False)

    ulp = torch.finfo(dtype).eps
    # m: each of the three roundings is at most half an ulp of the terms it combines.
    terms = beta1 * exp_avg_before.abs() + (1 - beta1) * g64.abs()
    assert ((exp_avg.to(torch.float64) - m64).abs() <= 2 * ulp * terms).all()
    # θ: the step is at most lr; a small m over a small ρh can carry a relative error of m
    # into the ratio, so hold the step to 1000 ulps of lr and θ itself to a few ulps.
    torch.testing.assert_close(param.to(torch.float64), theta64, rtol=4 * ulp,
                               atol=1000 * ulp * lr)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_step_over_many_tensors_is_bitwise_equal_whatever_the_thread_count(kernel,
                                                                                 threads):
    """Many tensors of uneven sizes, dealt out to threads by element count."""
    sizes = [5, 70_000, 1, 33, 131_072, 9, 250_001, 768]
    inputs = [_inputs(n, torch.float32, torch.float32, seed=n) for n in sizes]
    lists = [list(t) for t in zip(*inputs, strict=True)]
    expected = [[t.clone() for t in ts] for ts in lists]
    _single_tensor_sophia(*expected, **HYPER, maximize=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert fused.fused_sophia_(*lists, **HYPER, maximize=False) == []
    finally:
        torch.set_num_threads(previous)
    for want_list, got_list in zip(expected, lists, strict=True):
        for want, got in zip(want_list, got_list, strict=True):
            assert torch.equal(_bits(got), _bits(want))


def test_fused_kernel_leaves_unsupported_tensors_to_the_caller(kernel):
    dense = _inputs(64, torch.float32, torch.float32)
    strided_grad = list(_inputs((8, 8), torch.float32, torch.float32, seed=3))
    strided_grad[1] = strided_grad[1].t()  # laid out unlike θ
    integer_lr_state = list(_inputs(16, torch.float16, torch.float32, seed=4))
    integer_lr_state[2] = integer_lr_state[2].half()  # m not float32 for a float16 θ
    lists = [list(t) for t in zip(dense, strided_grad, integer_lr_state, strict=True)]
    before = [t.clone() for t in lists[0]]
    assert fused.fused_sophia_(*lists, **HYPER, maximize=False) == [1, 2]
    assert not torch.equal(lists[0][0], before[0])
    assert torch.equal(lists[0][1], before[1]) and torch.equal(lists[0][2], before[2])


def test_fused_kernel_takes_a_transposed_parameter_whose_state_shares_its_layout(kernel):
    inputs = [t.reshape(40, 25).t() for t in _inputs(1000, torch.float32, torch.float32)]
    expected, actual = [t.clone() for t in inputs], [t.clone() for t in inputs]
    actual = [t.t().contiguous().t() for t in inputs]  # same values, same transposed layout
    _single_tensor_sophia(*[[t] for t in expected], **HYPER, maximize=False)
    assert fused.fused_sophia_(*[[t] for t in actual], **HYPER, maximize=False) == []
    for want, got in zip(expected, actual, strict=True):
        assert torch.equal(_bits(got), _bits(want))


def test_fused_kernel_bumps_the_version_of_what_it_writes(kernel):
    param, grad, exp_avg, hessian = _inputs(10, torch.float32, torch.float32)
    versions = [t._version for t in (param, grad, exp_avg, hessian)]
    fused.fused_sophia_([param], [grad], [exp_avg], [hessian], **HYPER, maximize=False)
    assert [t._version for t in (param, grad, exp_avg, hessian)] == [
        versions[0] + 1, versions[1], versions[2] + 1, versions[3]]


def test_sophia_update_sends_what_the_kernel_skips_down_the_foreach_path(kernel):
    params = [_inputs(33, torch.float32, torch.float32, seed=s) for s in range(3)]
    params[1] = list(params[1])
    params[1][1] = params[1][1][::1].as_strided((33,), (1,))  # still dense: kernel takes it
    skipped = [t.reshape(3, 11).t() for t in _inputs(33, torch.float32, torch.float32, seed=9)]
    skipped[1] = skipped[1].contiguous()  # g laid out unlike θ: the kernel skips it
    tensors = [list(t) for t in zip(*params, skipped, strict=True)]
    expected = [[t.clone() for t in ts] for ts in tensors]
    _single_tensor_sophia(*expected, **HYPER, maximize=False)
    sophia_update(*tensors, **HYPER, foreach=True, fused=True)
    for want_list, got_list in zip(expected, tensors, strict=True):
        for want, got in zip(want_list, got_list, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def _train(optimizer_kwargs, *, steps=6, dtype=torch.float32, lr=HYPER["lr"]):
    """A few steps of SophiaG with GNB refreshes on a fixed gradient sequence."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(17, 5), (5,), (3, 4, 2), (40_000,), (300, 700)]
    params = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]
    optimizer = SophiaG(params, lr=lr, **optimizer_kwargs)
    for step in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(dtype)
        optimizer.step()
        if step % 2 == 0:
            optimizer.update_hessian(scale=8.0)
    return [p.detach() for p in params], optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sophiag_fused_trajectory_is_bitwise_that_of_the_for_loop(kernel, dtype):
    fused_params, fused_optimizer = _train(dict(fused=True), dtype=dtype)
    loop_params, loop_optimizer = _train(dict(fused=False, foreach=False), dtype=dtype)
    for got, want in zip(fused_params, loop_params, strict=True):
        assert torch.equal(_bits(got), _bits(want))
    states = zip(fused_optimizer.state.values(), loop_optimizer.state.values(), strict=True)
    for got, want in states:
        assert torch.equal(got["exp_avg"], want["exp_avg"])


def test_sophiag_with_a_tensor_lr_and_fused_none_takes_the_for_loop(kernel):
    default_params, _ = _train({}, lr=torch.tensor(HYPER["lr"]))
    loop_params, _ = _train(dict(fused=False), lr=torch.tensor(HYPER["lr"]))
    for got, want in zip(default_params, loop_params, strict=True):
        assert torch.equal(got, want)


def test_fused_true_with_a_tensor_lr_steps_as_with_its_value(kernel):
    """torch's CPU-fused AdamW takes a Tensor lr; so does fused=True, reading its value (it
    used to refuse one at construction, and one set after it at step())."""
    tensor_params, _ = _train(dict(fused=True), lr=torch.tensor(HYPER["lr"]))
    float_params, _ = _train(dict(fused=True), lr=HYPER["lr"])
    for got, want in zip(tensor_params, float_params, strict=True):
        assert torch.equal(got, want)
    param = torch.zeros(3, requires_grad=True)
    optimizer = SophiaG([param], fused=True, weight_decay=0.0)
    optimizer.param_groups[0]["lr"] = torch.tensor([[0.1]])  # set after construction, (1, 1)
    param.grad = torch.ones(3)
    optimizer.step()
    assert torch.allclose(param, torch.full((3,), -0.1))


@pytest.mark.parametrize("device, dtype", [("meta", torch.float32), ("cpu", torch.int64)])
def test_fused_true_on_a_param_the_kernel_cannot_step_raises_as_torch_does(kernel, device,
                                                                           dtype):
    param = torch.zeros(3, device=device, dtype=dtype)
    optimizer = SophiaG([param], fused=True)
    param.grad = torch.ones(3, device=device, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"`fused=True` requires all the params to be "
                                           rf"floating point .*{dtype} and {device}"):
        optimizer.step()


def test_fused_true_on_a_cuda_param_raises_as_torch_does(kernel):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; the meta case above takes the same check")
    param = torch.zeros(3, device="cuda", requires_grad=True)
    param.grad = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match=r"`fused=True` requires all the params"):
        SophiaG([param], fused=True).step()


def test_fused_none_on_a_param_the_kernel_cannot_step_takes_another_path_quietly():
    param = torch.zeros(3, device="meta", requires_grad=True)
    param.grad = torch.ones(3, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SophiaG([param]).step()
    assert SophiaG([param]).defaults["fused"] is None


def test_sophiag_defaults_to_the_fused_kernel_on_cpu(kernel, monkeypatch):
    calls = []
    real = fused._op
    monkeypatch.setattr(fused, "_op", lambda *args: calls.append(1) or real(*args))
    _train({})
    assert calls


def test_sophiag_with_an_explicit_foreach_does_not_use_the_kernel(kernel, monkeypatch):
    monkeypatch.setattr(fused, "_op", lambda *args: pytest.fail("kernel called"))
    _train(dict(foreach=False))
    _train(dict(foreach=True))


def test_sophiag_without_the_kernel_falls_back_with_one_warning(no_kernel):
    with pytest.warns(RuntimeWarning, match="fused CPU kernel is unavailable"):
        fallback_params, _ = _train({})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train({})
    loop_params, _ = _train(dict(foreach=False))
    for got, want in zip(fallback_params, loop_params, strict=True):
        assert torch.equal(got, want)


def test_sophiag_fused_true_without_the_kernel_raises(no_kernel):
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        SophiaG([torch.zeros(3, requires_grad=True)], fused=True)


def test_disabling_the_kernel_by_environment_falls_back_silently():
    script = (
        "import warnings, torch; warnings.simplefilter('error');"
        "import sophia_pytorch._kernel.loader as f; from sophia_pytorch import SophiaG;"
        "from sophia_pytorch.functional import fused_kernel_available;"
        "p = torch.ones(3, requires_grad=True); p.grad = torch.ones(3);"
        "SophiaG([p]).step(); assert not fused_kernel_available(); print(f.unavailable_reason())"
    )
    env = dict(os.environ, SOPHIA_DISABLE_FUSED="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "SOPHIA_DISABLE_FUSED" in result.stdout


@pytest.mark.parametrize("bad", ["yes", 1])
def test_fused_must_be_a_bool_or_none(bad):
    with pytest.raises(ValueError, match="fused"):
        SophiaG([torch.zeros(3, requires_grad=True)], fused=bad)


def test_fused_and_foreach_cannot_both_be_true():
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        SophiaG([torch.zeros(3, requires_grad=True)], fused=True, foreach=True)


def test_an_optimizer_pickled_before_fused_existed_loads_with_fused_none():
    optimizer = SophiaG([torch.zeros(3, requires_grad=True)], fused=False)
    state = optimizer.__getstate__()
    for group in state["param_groups"]:
        del group["fused"]
    optimizer.__setstate__(state)
    assert optimizer.param_groups[0]["fused"] is None


def test_the_foreach_path_is_the_kernel_fallback_and_agrees_with_the_for_loop():
    """Where the kernel is missing on CPU the user may pick foreach; it is close, not bitwise."""
    inputs = _inputs(1000, torch.float32, torch.float32, seed=5)
    expected, actual = _clone(inputs), _clone(inputs)
    _single_tensor_sophia(*[[t] for t in expected], **HYPER, maximize=False)
    _multi_tensor_sophia(*[[t] for t in actual], **HYPER, maximize=False)
    for want, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got, want)


def test_a_second_process_loads_the_cached_kernel_without_compiling(kernel):
    script = (
        "import sophia_pytorch._kernel.loader as f;"
        "from sophia_pytorch.functional import fused_kernel_available;"
        "assert fused_kernel_available(), f.unavailable_reason();"
        "info = f.build_info(); print(info.cached, info.seconds)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    cached, seconds = result.stdout.split()
    assert cached == "True" and float(seconds) < 5.0


def test_the_load_time_probe_accepts_the_kernel_and_rejects_one_that_rounds_otherwise(kernel):
    def unfused_multiply_add(params, grads, exp_avgs, hessians, decay, beta1, one_minus_beta1,
                             rho, eps, neg_lr, maximize):
        for param, grad, exp_avg, hessian in zip(params, grads, exp_avgs, hessians,
                                                 strict=True):
            param.mul_(decay)
            exp_avg.mul_(beta1).add_(grad * one_minus_beta1)  # rounds g·(1−β1) first
            ratio = (exp_avg / (rho * hessian).clamp(min=eps)).clamp(-1, 1)
            param.add_(ratio, alpha=neg_lr)
        return []

    assert fused._rounds_as_torch_does(fused._op, _single_tensor_sophia)
    assert not fused._rounds_as_torch_does(unfused_multiply_add, _single_tensor_sophia)


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.touch()
    fresh.touch()
    os.utime(stale, (0, 0))
    fused._remove_stale_lock(stale)
    fused._remove_stale_lock(fresh)
    fused._remove_stale_lock(tmp_path / "absent")
    assert not stale.exists() and fresh.exists()


def _step_in_a_fresh_process(tmp_path, **env):
    """One default SophiaG step in a new process with an empty kernel cache; its stderr."""
    script = ("import torch; from sophia_pytorch import SophiaG;"
              "p = torch.ones(3, requires_grad=True); p.grad = torch.ones(3); SophiaG([p]).step()")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), **env}
    env.pop("SOPHIA_DISABLE_FUSED", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.slow  # a fresh process imports torch: 10-30 s on a loaded 2-core machine
def test_without_a_compiler_the_warning_names_it_first_and_nothing_claims_to_compile(tmp_path):
    """A real process on a machine without the compiler torch would run (CXX names none)."""
    stderr = _step_in_a_fresh_process(tmp_path, CXX="sophia-no-such-c++")
    warning = [line for line in stderr.splitlines() if "fused CPU kernel is unavailable" in line]
    assert len(warning) == 1, stderr
    assert "unavailable: sophia-no-such-c++: not found;" in warning[0]
    assert "-MMD" not in warning[0] and "-isystem" not in warning[0]  # no command line
    assert "compiling" not in stderr


@pytest.mark.slow
def test_a_failed_build_warns_with_the_compilers_error_line(tmp_path):
    """A real build with a compiler that fails: the warning shows its error, not the command."""
    if shutil.which("g++") is None:
        pytest.skip("the stand-in compiler answers `--version` with g++'s")
    compiler = tmp_path / "bin" / "c++"
    compiler.parent.mkdir()
    compiler.write_text("#!/bin/sh\n"  # answers torch's `c++ --version`, fails to compile
                        "[ \"$1\" = --version ] && exec g++ --version\n"
                        "echo 'sophia_step.cpp:1:10: fatal error: torch/extension.h: "
                        "No such file or directory' >&2\nexit 1\n")
    compiler.chmod(0o755)
    stderr = _step_in_a_fresh_process(
        tmp_path, CXX="c++", PATH=f"{compiler.parent}{os.pathsep}{os.environ['PATH']}")
    warning = [line for line in stderr.splitlines() if "fused CPU kernel is unavailable" in line]
    assert len(warning) == 1, stderr
    assert "unavailable: sophia_step.cpp:1:10: fatal error: torch/extension.h" in warning[0]


def test_the_cause_of_a_build_log_is_its_not_found_line():
    log = ("RuntimeError: Error building extension 'sophia_step_0': [1/2] c++ -MMD -MF "
           "sophia_step.o.d -isystem /torch/include -fPIC -c sophia_step.cpp -o sophia_step.o\n"
           "FAILED: sophia_step.o\nc++ -MMD -MF sophia_step.o.d -c sophia_step.cpp\n"
           "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.\n")
    assert fused._cause(log) == "/bin/sh: 1: c++: not found"
    assert fused._cause("RuntimeError: something else\nmore") == "RuntimeError: something else"
