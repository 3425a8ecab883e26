"""The Sophia update rule, held to a float64 NumPy transcription of the contract.

Gradients and Hessian estimates are injected (drawn from a seeded generator, independent of the
parameters), so the reference sees exactly the inputs the optimizer sees and any difference is the
optimizer's arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sophia_pytorch
from tests.optim.reference import (
    ReferenceParam,
    as_numpy,
    bf16_ulp,
    optimizer_paths,
    reference_refresh,
    reference_step,
    torch_on_one_thread,  # noqa: F401  (autouse fixture)
)

PATHS = optimizer_paths()
GNB_SCALE = 7.0
GROUP_HYPERPARAMETERS = [
    dict(lr=0.02, betas=(0.9, 0.95), rho=0.3, weight_decay=0.1, eps=1e-12),
    dict(lr=0.05, betas=(0.8, 0.5), rho=1.0, weight_decay=0.0, eps=1e-15),
]


def _reference_kwargs(group: dict) -> dict:
    return dict(
        lr=float(group["lr"]), beta1=group["betas"][0], rho=group["rho"],
        weight_decay=group["weight_decay"], eps=group["eps"],
    )


def _assert_states_match(optimizer, params, references, *, rtol: float, atol: float) -> None:
    for param, reference in zip(params, references, strict=True):
        state = optimizer.state[param]
        np.testing.assert_allclose(as_numpy(state["exp_avg"]), reference.exp_avg, rtol, atol)
        np.testing.assert_allclose(as_numpy(state["hessian"]), reference.hessian, rtol, atol)
        assert int(state["step"]) == reference.steps


@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("path", list(PATHS))
def test_sophiag_matches_float64_reference_over_groups_and_refreshes(path, maximize):
    """16 steps, a GNB refresh every 4 (first at step 3, so steps 1-2 run on h = 0), two groups
    with different hyperparameters, a parameter that never gets a gradient and a zero-size one:
    parameters, m and h agree with the float64 transcription of the contract."""
    generator = torch.Generator().manual_seed(0)
    shapes = [[(5, 4), (3,)], [(6,), (0, 3)]]
    groups = [
        {"params": [torch.randn(s, generator=generator, dtype=torch.float64) for s in group_shapes],
         **hyper}
        for group_shapes, hyper in zip(shapes, GROUP_HYPERPARAMETERS, strict=True)
    ]
    idle = torch.randn(4, generator=generator, dtype=torch.float64)
    groups[1]["params"].append(idle)
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    idle_before = idle.detach().clone()
    active = [[p for p in g["params"] if p is not idle] for g in groups]
    references = [[ReferenceParam(as_numpy(p)) for p in ps] for ps in active]

    optimizer = sophia_pytorch.SophiaG(groups, **PATHS[path], maximize=maximize)
    saw_clipped = saw_unclipped = False
    for t in range(16):
        if t % 4 == 2:
            for ps, refs, hyper in zip(active, references, GROUP_HYPERPARAMETERS, strict=True):
                for p, ref in zip(ps, refs, strict=True):
                    p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                    estimate = GNB_SCALE * as_numpy(p.grad) ** 2
                    reference_refresh(ref, estimate, beta2=hyper["betas"][1])
            optimizer.update_hessian(scale=GNB_SCALE)
        for ps, refs, hyper in zip(active, references, GROUP_HYPERPARAMETERS, strict=True):
            for p, ref in zip(ps, refs, strict=True):
                p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                reference_step(ref, as_numpy(p.grad), maximize=maximize, **_reference_kwargs(hyper))
                ratio = np.abs(ref.exp_avg / np.maximum(hyper["rho"] * ref.hessian, hyper["eps"]))
                saw_clipped |= bool((ratio > 1).any())
                saw_unclipped |= bool((ratio < 1).any())
        optimizer.step()

    assert saw_clipped and saw_unclipped, "the scenario must exercise both sides of the clip"
    for ps, refs in zip(active, references, strict=True):
        for p, ref in zip(ps, refs, strict=True):
            np.testing.assert_allclose(as_numpy(p), ref.theta, rtol=1e-12, atol=1e-14)
        _assert_states_match(optimizer, ps, refs, rtol=1e-12, atol=1e-14)
    assert torch.equal(idle, idle_before)
    assert idle not in optimizer.state


@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("path", list(PATHS))
def test_sophiah_matches_float64_reference_with_negative_curvature(path, maximize):
    """SophiaH refreshed on L = ½·Σ a⊙θ² (a diagonal Hessian, so u⊙(H·u) = a exactly for any ±1
    probe u), a of mixed sign: 12 steps with a refresh every 3 agree with the reference, including
    coordinates whose h is negative (denominator floored at ε)."""
    generator = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=generator, dtype=torch.float64, requires_grad=True)
              for s in [(4, 3), (5,)]]
    curvatures = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    assert any((a < 0).any() for a in curvatures) and any((a > 0).any() for a in curvatures)
    groups = [
        {"params": [p], **hyper} for p, hyper in zip(params, GROUP_HYPERPARAMETERS, strict=True)
    ]
    references = [ReferenceParam(as_numpy(p)) for p in params]
    optimizer = sophia_pytorch.SophiaH(groups, **PATHS[path], maximize=maximize)

    def quadratic() -> torch.Tensor:
        return sum(0.5 * (a * p * p).sum() for a, p in zip(curvatures, params, strict=True))

    probes = torch.Generator().manual_seed(2)
    for t in range(12):
        if t % 3 == 1:
            optimizer.update_hessian(quadratic, generator=probes)
            for ref, a, hyper in zip(references, curvatures, GROUP_HYPERPARAMETERS, strict=True):
                reference_refresh(ref, as_numpy(a), beta2=hyper["betas"][1])
        for p, ref, hyper in zip(params, references, GROUP_HYPERPARAMETERS, strict=True):
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            reference_step(ref, as_numpy(p.grad), maximize=maximize, **_reference_kwargs(hyper))
        optimizer.step()

    assert any((ref.hessian < 0).any() for ref in references)
    for p, ref in zip(params, references, strict=True):
        np.testing.assert_allclose(as_numpy(p), ref.theta, rtol=1e-12, atol=1e-14)
    _assert_states_match(optimizer, params, references, rtol=1e-12, atol=1e-14)


# A power of two, so that lr·x rounds the same however the product is formed: the paths and the
# two kinds of lr can then be asked for identical bits.
LR = 2.0**-7
INJECTED = dict(betas=(0.9, 0.9), rho=0.5, weight_decay=0.1, eps=1e-15)


def _run_injected(dtype: torch.dtype, flags: dict, lr, steps: int = 15):
    """SophiaG on two parameters of ``dtype`` with seeded injected gradients and a GNB refresh
    every 4 steps. Returns the parameters, the optimizer, the float64 references, and per step
    (parameters before, parameters after, reference (m, h) after)."""
    generator = torch.Generator().manual_seed(3)
    params = [(0.1 * torch.randn(s, generator=generator)).to(dtype).requires_grad_()
              for s in [(6, 5), (7,)]]
    optimizer = sophia_pytorch.SophiaG(params, lr=lr, **INJECTED, **flags)
    references = [ReferenceParam(as_numpy(p)) for p in params]
    hyper = dict(lr=LR, **INJECTED)
    history = []
    for t in range(steps):
        if t % 4 == 1:
            for p, ref in zip(params, references, strict=True):
                p.grad = torch.randn(p.shape, generator=generator).to(dtype)
                reference_refresh(ref, 3.0 * as_numpy(p.grad) ** 2, beta2=hyper["betas"][1])
            optimizer.update_hessian(scale=3.0)
        before = [as_numpy(p) for p in params]
        for p, ref in zip(params, references, strict=True):
            p.grad = torch.randn(p.shape, generator=generator).to(dtype)
            reference_step(ref, as_numpy(p.grad), **_reference_kwargs(hyper))
        optimizer.step()
        history.append((before, [p.detach().clone() for p in params],
                        [(ref.exp_avg.copy(), ref.hessian.copy()) for ref in references]))
    return params, optimizer, references, history


LR_KINDS = {
    "float-lr": lambda dtype: LR,
    # A Tensor lr in the parameters' precision (float32 for bf16, whose state is float32).
    "tensor-lr": lambda dtype: torch.tensor(LR, dtype=torch.promote_types(dtype, torch.float32)),
}
# Every (path, lr kind); fused=True reads a Tensor lr's value.
PATH_LR = [(path, kind) for path in PATHS for kind in LR_KINDS]
TENSOR_LR_PATHS = list(PATHS)


@pytest.mark.parametrize(("path", "lr_kind"), PATH_LR, ids=[f"{p}-{k}" for p, k in PATH_LR])
def test_float32_path_matches_float64_reference(path, lr_kind):
    """float32 parameters and state track the float64 reference to float32 accuracy."""
    lr = LR_KINDS[lr_kind](torch.float32)
    params, optimizer, references, _ = _run_injected(torch.float32, PATHS[path], lr)
    for p, ref in zip(params, references, strict=True):
        assert optimizer.state[p]["exp_avg"].dtype == torch.float32
        np.testing.assert_allclose(as_numpy(p), ref.theta, rtol=1e-5, atol=1e-6)
    _assert_states_match(optimizer, params, references, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", TENSOR_LR_PATHS)
def test_float64_path_with_tensor_lr_matches_float64_reference(path):
    """float64 parameters with a float64 Tensor lr: the reference to float64 accuracy."""
    lr = torch.tensor(LR, dtype=torch.float64)
    params, optimizer, references, _ = _run_injected(torch.float64, PATHS[path], lr)
    for p, ref in zip(params, references, strict=True):
        np.testing.assert_allclose(as_numpy(p), ref.theta, rtol=1e-12, atol=1e-15)
    _assert_states_match(optimizer, params, references, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["float64", "float32", "bfloat16"])
def test_all_paths_and_lr_kinds_give_identical_parameters(dtype):
    """Every path, with a float lr and a 0-dim Tensor lr of the same value: the same elementwise
    operations rounded the same way, so the same bits as the for-loop with a float lr."""
    results = {
        (path, kind): _run_injected(dtype, PATHS[path], LR_KINDS[kind](dtype))
        for path, kind in PATH_LR
    }
    base_params, base_optimizer, _, _ = results[("for-loop", "float-lr")]
    for params, optimizer, _, _ in results.values():
        for p, q in zip(params, base_params, strict=True):
            assert torch.equal(p, q)
            for key in ("exp_avg", "hessian"):
                assert torch.equal(optimizer.state[p][key], base_optimizer.state[q][key])


def test_default_float32_tensor_lr_keeps_float64_parameters_at_float64_precision():
    """``lr=torch.tensor(2**-7)`` (torch's default float32, the value exactly representable) on
    float64 parameters must follow the float64 reference: no part of the step (the decay factor
    1 − lr·wd included) may be rounded to the Tensor lr's float32."""
    lr = torch.tensor(LR)
    assert lr.dtype == torch.float32 and float(lr) == LR
    params, _, references, _ = _run_injected(torch.float64, PATHS["for-loop"], lr)
    for p, ref in zip(params, references, strict=True):
        np.testing.assert_allclose(as_numpy(p), ref.theta, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("path", "lr_kind"), PATH_LR, ids=[f"{p}-{k}" for p, k in PATH_LR])
def test_bfloat16_parameters_keep_float32_state_and_follow_the_reference(path, lr_kind):
    """bf16 parameters: m and h are float32 and match the float64 reference to float32 accuracy;
    each step lands within one bf16 ulp of the exact float64 update of the bf16 parameter (one
    rounding of the result, plus the rounding of the separately applied weight decay)."""
    lr = LR_KINDS[lr_kind](torch.bfloat16)
    params, optimizer, references, history = _run_injected(torch.bfloat16, PATHS[path], lr)
    for p in params:
        assert p.dtype == torch.bfloat16
        assert optimizer.state[p]["exp_avg"].dtype == torch.float32
        assert optimizer.state[p]["hessian"].dtype == torch.float32
    _assert_states_match(optimizer, params, references, rtol=1e-5, atol=1e-7)

    decay, rho, eps = 1 - LR * INJECTED["weight_decay"], INJECTED["rho"], INJECTED["eps"]
    moved_ulps = []
    for before, after, states in history:
        for theta_old, theta_new, (exp_avg, hessian) in zip(before, after, states, strict=True):
            exact = theta_old * decay - LR * np.clip(
                exp_avg / np.maximum(rho * hessian, eps), -1, 1)
            ulp = bf16_ulp(np.maximum(np.abs(exact), np.abs(theta_old)))
            assert (np.abs(as_numpy(theta_new) - exact) <= ulp).all()
            moved_ulps.append(np.abs(exact - theta_old) / ulp)
    # The check is only meaningful if the steps are large against the bf16 spacing.
    assert np.median(np.concatenate([m.ravel() for m in moved_ulps])) > 3


def test_negative_hessian_gives_a_full_step_along_the_momentum():
    """h < 0 (possible with Hutchinson): max(ρh, ε) = ε, so the step is a full −lr·sign(m), never
    the reversed, shrunken step that ρh + ε would give."""
    theta = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    optimizer = sophia_pytorch.SophiaH([theta], lr=0.1, betas=(0.5, 0.0), weight_decay=0.0)
    curvature = torch.tensor([-4.0, -0.01, -1.0, -2.0], dtype=torch.float64)
    concave = lambda: -0.5 * (curvature.abs() * theta * theta).sum()
    optimizer.update_hessian(concave)
    hessian = optimizer.state[theta]["hessian"]
    np.testing.assert_array_equal(as_numpy(hessian), as_numpy(-curvature.abs()))

    before = theta.detach().clone()
    theta.grad = torch.tensor([0.3, -1e-3, -2.0, 1e-9], dtype=torch.float64)
    optimizer.step()
    exp_avg = optimizer.state[theta]["exp_avg"]
    full_step = before - 0.1 * torch.sign(theta.grad)
    torch.testing.assert_close(theta.detach(), full_step, rtol=0, atol=0)
    assert (torch.sign(before - theta.detach()) == torch.sign(exp_avg)).all()


def test_first_step_from_zero_hessian_is_a_sign_step():
    """m and h start at zero: before any refresh the denominator is ε, so every coordinate with a
    nonzero gradient moves by exactly lr (decay aside) against its gradient."""
    theta = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([theta], lr=0.25, weight_decay=0.2)
    theta.grad = torch.tensor([1e-6, 3.0, -0.5], dtype=torch.float64)
    optimizer.step()
    expected = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64) * (1 - 0.25 * 0.2)
    expected -= 0.25 * torch.sign(theta.grad)
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("path", list(PATHS))
def test_zero_eps_never_makes_a_parameter_nan(path):
    """eps = 0 is not negative, so the contract allows it: then a coordinate with m = 0 and
    h = 0 (a zero gradient before any refresh) has 0/0 to clamp. Either the constructor rejects
    eps = 0 with a ValueError naming it, or that coordinate stays finite and does not move."""
    theta = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    try:
        optimizer = sophia_pytorch.SophiaG(
            [theta], lr=0.1, eps=0.0, weight_decay=0.0, **PATHS[path]
        )
    except ValueError as error:
        assert "eps" in str(error) and "0.0" in str(error)
        return
    theta.grad = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    optimizer.step()
    assert torch.isfinite(theta).all(), theta
    torch.testing.assert_close(theta.detach(), torch.tensor([1.0, 1.9, -0.9], dtype=torch.float64))


@pytest.mark.parametrize("path", list(PATHS))
def test_a_one_element_tensor_lr_of_any_shape_steps_as_a_0_dim_one(path):
    """A (1, 1) Tensor lr was accepted at construction and crashed the for-loop step; foreach
    took only a 0-dim one."""
    shaped, _, _, _ = _run_injected(torch.float32, PATHS[path], torch.tensor([[LR]]), steps=5)
    flat, _, _, _ = _run_injected(torch.float32, PATHS[path], torch.tensor(LR), steps=5)
    for got, want in zip(shaped, flat, strict=True):
        assert torch.equal(got, want)
