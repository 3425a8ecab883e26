"""The refresh options of SophiaG/SophiaH against float64 references written from their formulas.

* ``bias_correction``: the step uses ``h_ema / (1 − β2^r)`` after r refreshes;
* ``refresh_at_start``: a refresh is due before the first step;
* ``unclipped_band``: after each refresh ρ moves by √2 until the unclipped fraction is in band;
* ``update_hessian(grad_scale=...)``: gradients of a scaled loss give the unscaled estimate, and
  a non-finite one is skipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sophia_pytorch
from tests.optim.reference import (
    ReferenceParam,
    as_numpy,
    optimizer_paths,
    reference_step,
    torch_on_one_thread,  # noqa: F401  (autouse fixture)
)

PATHS = optimizer_paths()
HYPER = dict(lr=0.02, betas=(0.9, 0.95), rho=0.3, weight_decay=0.1, eps=1e-12)


def _random_run(options: dict, path: dict, steps: int = 30, every: int = 4):
    """Train two float64 tensors on random gradients with GNB-style refreshes (random ĝ,
    scale 8) every ``every`` steps; return the optimizer, params and the recorded inputs."""
    generator = torch.Generator().manual_seed(11)
    params = [torch.randn(s, generator=generator, dtype=torch.float64, requires_grad=True)
              for s in [(7, 5), (9,)]]
    optimizer = sophia_pytorch.SophiaG(params, **HYPER, **options, **path)
    log = []  # ("refresh", [ĝ]) or ("step", [g], rho of the group at that step)
    for t in range(steps):
        if t % every == 0:
            grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.1
                     for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.update_hessian(scale=8)
            log.append(("refresh", [as_numpy(g) for g in grads]))
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        log.append(("step", [as_numpy(g) for g in grads], optimizer.param_groups[0]["rho"]))
        optimizer.step()
    return optimizer, params, log


def _fraction(refs: list[ReferenceParam], rho: float) -> float:
    unclipped = sum(int((np.abs(r.exp_avg) < rho * r.hessian).sum()) for r in refs)
    return unclipped / sum(r.theta.size for r in refs)


def _replay(params0: list[np.ndarray], log, *, bias_correction: bool,
            band: tuple[float, float] | None) -> tuple[list[ReferenceParam], float]:
    """The float64 reference of the options, applied to the recorded gradients."""
    beta2 = HYPER["betas"][1]
    refs = [ReferenceParam(p) for p in params0]
    ema = [np.zeros_like(p) for p in params0]
    refreshes, rho = 0, HYPER["rho"]
    for entry in log:
        if entry[0] == "refresh":
            refreshes += 1
            for i, g in enumerate(entry[1]):
                ema[i] = beta2 * ema[i] + (1 - beta2) * 8 * g * g
                correction = 1 - beta2 ** refreshes if bias_correction else 1.0
                refs[i].hessian = ema[i] / correction
            if band is not None:
                low, high = band
                fraction = _fraction(refs, rho)
                direction = 1 if fraction < low else -1 if fraction > high else 0
                for _ in range(16 if direction else 0):
                    rho *= math.sqrt(2) ** direction
                    fraction = _fraction(refs, rho)
                    if low <= fraction <= high or (direction > 0) != (fraction < low):
                        break
            continue
        for ref, g in zip(refs, entry[1]):
            reference_step(ref, g, lr=HYPER["lr"], beta1=HYPER["betas"][0], rho=rho,
                           weight_decay=HYPER["weight_decay"], eps=HYPER["eps"])
    return refs, rho


def _initial_params() -> list[np.ndarray]:
    generator = torch.Generator().manual_seed(11)
    return [as_numpy(torch.randn(s, generator=generator, dtype=torch.float64))
            for s in [(7, 5), (9,)]]


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("bias_correction", [False, True], ids=["plain", "bias-corrected"])
def test_steps_use_the_bias_corrected_hessian(path, bias_correction):
    optimizer, params, log = _random_run(dict(bias_correction=bias_correction), path)
    refs, _ = _replay(_initial_params(), log, bias_correction=bias_correction, band=None)
    for p, ref in zip(params, refs, strict=True):
        np.testing.assert_allclose(as_numpy(p), ref.theta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(as_numpy(optimizer.state[p]["hessian"]), ref.hessian,
                                   rtol=1e-10, atol=1e-14)


def test_bias_correction_changes_the_trajectory():
    """Guards the test above against comparing two identical runs."""
    _, plain, _ = _random_run({}, {})
    _, corrected, _ = _random_run(dict(bias_correction=True), {})
    assert not torch.allclose(plain[0], corrected[0])


def test_the_first_bias_corrected_refresh_sets_h_to_the_estimate():
    param = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], bias_correction=True)
    param.grad = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    optimizer.update_hessian(scale=3)
    expected = 3 * np.array([1.0, 4.0, 0.25, 0.0])
    np.testing.assert_allclose(as_numpy(optimizer.state[param]["hessian"]), expected, rtol=1e-15)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_unclipped_band_moves_rho_as_the_reference_does(path):
    band = (0.3, 0.5)
    optimizer, params, log = _random_run(dict(unclipped_band=band, bias_correction=True), path)
    refs, rho = _replay(_initial_params(), log, bias_correction=True, band=band)
    assert optimizer.param_groups[0]["rho"] == pytest.approx(rho, rel=1e-12)
    assert rho != HYPER["rho"]
    for p, ref in zip(params, refs, strict=True):
        np.testing.assert_allclose(as_numpy(p), ref.theta, rtol=1e-10, atol=1e-12)


def test_after_a_refresh_the_unclipped_fraction_lies_in_the_band():
    generator = torch.Generator().manual_seed(3)
    param = torch.randn(10_000, generator=generator, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], rho=1e-4, unclipped_band=(0.2, 0.4))
    for _ in range(3):
        param.grad = torch.randn(10_000, generator=generator)
        optimizer.step()
        param.grad = torch.randn(10_000, generator=generator)
        optimizer.update_hessian(scale=100)
        assert 0.2 <= optimizer.unclipped_fraction() <= 0.4


def test_each_group_adapts_its_own_rho():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(1000, generator=generator, requires_grad=True)
    b = torch.randn(1000, generator=generator, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([{"params": [a]}, {"params": [b]}], rho=1.0,
                                       unclipped_band=(0.4, 0.6))
    a.grad, b.grad = torch.ones(1000), torch.ones(1000)
    optimizer.step()
    a.grad = torch.rand(1000, generator=generator) * 10  # large curvature: rho must fall
    b.grad = torch.rand(1000, generator=generator) * 0.01  # small curvature: rho must rise
    optimizer.update_hessian(scale=1)
    rho_a, rho_b = (g["rho"] for g in optimizer.param_groups)
    assert rho_a < 1.0 < rho_b


def test_refresh_at_start_makes_a_refresh_due_before_the_first_step():
    param = torch.zeros(2, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], refresh_every=5, refresh_at_start=True)
    refreshed_at = []
    for step in range(12):
        for _ in range(2):  # asking twice (before and after a step) never refreshes twice
            if optimizer.hessian_due():
                param.grad = torch.ones(2)
                optimizer.update_hessian(scale=1)
                refreshed_at.append(optimizer.steps_taken())
        param.grad = torch.ones(2)
        optimizer.step()
        assert optimizer.steps_taken() == step + 1
    assert refreshed_at == [0, 5, 10]


def test_without_refresh_at_start_nothing_is_due_before_the_first_step():
    optimizer = sophia_pytorch.SophiaG([torch.zeros(2, requires_grad=True)], refresh_every=5)
    assert not optimizer.hessian_due()


# ------------------------------------------------------------------- mixed precision


def _classifier_grads(seed: int, scale: float):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    inputs = torch.randn(32, 6)
    loss, num_samples = sophia_pytorch.sampled_cross_entropy(
        model(inputs), generator=torch.Generator().manual_seed(9))
    (loss * scale).backward()
    return model, num_samples


def test_grad_scale_unscales_the_gradient_of_a_scaled_loss():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    torch.manual_seed(0)
    plain_model, num_samples = _classifier_grads(0, 1.0)
    plain = sophia_pytorch.SophiaG(plain_model.parameters())
    assert plain.update_hessian(scale=num_samples)
    scaled_model, _ = _classifier_grads(0, scaler.get_scale())
    scaled = sophia_pytorch.SophiaG(scaled_model.parameters())
    assert scaled.update_hessian(scale=num_samples, grad_scale=scaler.get_scale())
    assert scaler.get_scale() == 2.0**12
    for p, q in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        torch.testing.assert_close(scaled.state[q]["hessian"], plain.state[p]["hessian"],
                                   rtol=1e-6, atol=0)


def test_a_non_finite_scaled_gradient_skips_the_refresh():
    model, num_samples = _classifier_grads(0, 1.0)
    optimizer = sophia_pytorch.SophiaG(model.parameters())
    optimizer.update_hessian(scale=num_samples)
    before = {p: optimizer.state[p]["hessian"].clone() for p in model.parameters()}
    next(model.parameters()).grad[0, 0] = float("inf")
    assert optimizer.update_hessian(scale=num_samples, grad_scale=1024.0) is False
    for p in model.parameters():
        assert torch.equal(optimizer.state[p]["hessian"], before[p])
        assert float(optimizer.state[p]["hessian_step"]) == 1


def test_a_tensor_scale_equals_a_float_scale():
    results = []
    for scale in (32.0, torch.tensor(32.0)):
        model, _ = _classifier_grads(1, 1.0)
        optimizer = sophia_pytorch.SophiaG(model.parameters())
        optimizer.update_hessian(scale=scale)
        results.append([optimizer.state[p]["hessian"] for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_sophiah_grad_scale_divides_the_hessian_vector_product():
    hessians = []
    for scale in (1.0, 256.0):
        torch.manual_seed(2)
        model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        inputs = torch.randn(16, 5)
        optimizer = sophia_pytorch.SophiaH(model.parameters())
        assert optimizer.update_hessian(
            lambda m=model, s=scale, x=inputs: (m(x) ** 2).mean() * s,
            generator=torch.Generator().manual_seed(5),
            grad_scale=None if scale == 1.0 else scale,
        ) is True
        hessians.append([optimizer.state[p]["hessian"].clone() for p in model.parameters()])
    for got, want in zip(hessians[1], hessians[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_a_tensor_scale_with_more_than_one_element_is_refused():
    param = torch.zeros(2, requires_grad=True)
    param.grad = torch.ones(2)
    optimizer = sophia_pytorch.SophiaG([param])
    with pytest.raises(ValueError, match="one element"):
        optimizer.update_hessian(scale=torch.tensor([8.0, 8.0]))
    assert param not in optimizer.state  # nothing was folded in or counted


@pytest.mark.parametrize("key, value", [
    ("bias_correction", 1), ("refresh_at_start", "yes"), ("unclipped_band", (0.5, 0.1)),
    ("unclipped_band", 0.3), ("unclipped_band", (0.1, float("nan"))), ("lr", float("inf")),
    ("rho", float("nan")), ("weight_decay", float("inf")), ("eps", float("inf")),
])
def test_invalid_refresh_options_and_non_finite_values_are_refused(key, value):
    with pytest.raises(ValueError, match=key.split("_")[0]):
        sophia_pytorch.SophiaG([torch.zeros(2, requires_grad=True)], **{key: value})


# ------------------------------------------------------- refused refreshes change nothing


def _refreshed_once(dtype=torch.float32, **options):
    """A SophiaG with one step and one refresh behind it, and a fresh gradient in p.grad."""
    param = torch.linspace(-1, 1, 6, dtype=dtype).requires_grad_()
    optimizer = sophia_pytorch.SophiaG([param], **options)
    param.grad = torch.linspace(0.5, 2, 6, dtype=dtype)
    optimizer.step()
    assert optimizer.update_hessian(scale=4) is True
    param.grad = torch.linspace(-3, 3, 6, dtype=dtype)
    return param, optimizer


def _snapshot(optimizer) -> list:
    return [optimizer.param_groups[0]["rho"]] + [
        {k: v.clone() for k, v in state.items()} for state in optimizer.state.values()]


def _assert_unchanged(optimizer, before) -> None:
    after = _snapshot(optimizer)
    assert after[0] == before[0]
    for got, want in zip(after[1:], before[1:], strict=True):
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key


BAD_GRAD_SCALES = [0.0, -1024.0, float("nan"), float("inf"), "1024", True]


@pytest.mark.parametrize("grad_scale", BAD_GRAD_SCALES, ids=repr)
def test_an_invalid_grad_scale_is_refused_and_changes_nothing(grad_scale):
    param, optimizer = _refreshed_once(unclipped_band=(0.2, 0.4))
    before = _snapshot(optimizer)
    with pytest.raises(ValueError, match="grad_scale"):
        optimizer.update_hessian(scale=4, grad_scale=grad_scale)
    _assert_unchanged(optimizer, before)


@pytest.mark.parametrize("grad_scale", BAD_GRAD_SCALES, ids=repr)
def test_sophiah_refuses_an_invalid_grad_scale_before_its_hessian_vector_product(grad_scale):
    param = torch.ones(3, requires_grad=True)
    optimizer = sophia_pytorch.SophiaH([param])

    def closure():
        raise AssertionError("the closure must not run")

    with pytest.raises(ValueError, match="grad_scale"):
        optimizer.update_hessian(closure, grad_scale=grad_scale)
    assert param not in optimizer.state


@pytest.mark.parametrize(("name", "value"), [
    ("grad_scale", 0.0), ("grad_scale", -2.0), ("grad_scale", float("nan")),
    ("grad_scale", float("inf")), ("scale", -2.0), ("scale", float("nan")),
    ("scale", float("inf")),  # scale = 0 is valid: an empty sample count
])
def test_an_invalid_tensor_scale_is_refused_in_the_one_host_read(name, value):
    """A Tensor's value is read only where the refresh reads the device anyway (with a
    grad_scale): there a bad one is a ValueError, and nothing changes."""
    param, optimizer = _refreshed_once(bias_correction=True)
    before = _snapshot(optimizer)
    kwargs = dict(scale=4.0, grad_scale=torch.tensor(2.0))
    kwargs[name] = torch.tensor(value)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        optimizer.update_hessian(**kwargs)
    _assert_unchanged(optimizer, before)


def test_a_tensor_grad_scale_equals_a_float_grad_scale():
    hessians = []
    for grad_scale in (256.0, torch.tensor(256.0)):
        param, optimizer = _refreshed_once(torch.float64)
        param.grad.mul_(256.0)
        assert optimizer.update_hessian(scale=4, grad_scale=grad_scale) is True
        hessians.append(optimizer.state[param]["hessian"])
    assert torch.equal(hessians[0], hessians[1])


@pytest.mark.parametrize(("dtype", "scale", "grad_scale"), [
    (torch.float32, 1e308, None), (torch.float32, 4.0, 1e-30),
    (torch.float64, 1e308, 1e-300), (torch.bfloat16, 1e41, None),
], ids=["float32-scale", "float32-grad_scale", "float64", "bfloat16-state-float32"])
def test_a_scale_that_overflows_the_state_is_refused_and_changes_nothing(dtype, scale,
                                                                        grad_scale):
    param, optimizer = _refreshed_once(dtype)
    before = _snapshot(optimizer)
    with pytest.raises(ValueError, match="overflows"):
        optimizer.update_hessian(scale=scale, grad_scale=grad_scale)
    _assert_unchanged(optimizer, before)


def test_a_skipped_refresh_changes_no_counter_rho_or_hessian():
    param, optimizer = _refreshed_once(unclipped_band=(0.2, 0.4), bias_correction=True)
    before = _snapshot(optimizer)
    param.grad[2] = float("nan")
    assert optimizer.update_hessian(scale=4, grad_scale=8.0) is False
    _assert_unchanged(optimizer, before)


def test_a_first_refresh_that_is_skipped_creates_no_state():
    param = torch.ones(3, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param])
    param.grad = torch.tensor([1.0, float("inf"), 1.0])
    assert optimizer.update_hessian(scale=1, grad_scale=2.0) is False
    assert param not in optimizer.state and optimizer.refreshes_done() == 0


@pytest.mark.parametrize("name", ["SophiaG", "SophiaH"])
def test_update_hessian_returns_true_when_folded(name):
    param = torch.ones(3, requires_grad=True)
    optimizer = getattr(sophia_pytorch, name)([param])
    if name == "SophiaG":
        param.grad = torch.ones(3)
        result = optimizer.update_hessian(scale=2)
    else:
        result = optimizer.update_hessian(lambda: (param ** 3).sum())
    assert result is True and optimizer.refreshes_done() == 1
