"""The sampled losses in low precision: a property test against the float64 Gauss-Newton
diagonal over dtypes (float32, bfloat16, float16), output magnitudes, masks and shapes, and
the refresh's sample count at float16's range.

The model is R independent linear heads f_r = x_r W_rᵀ + c (x_r: B positions × K inputs,
c a constant offset that sets |f|), evaluated in the dtype under test from float32 weights.
One backward of the *sum* of the sampled losses gives each head's S_r = Σ_i ĝ_i x_iᵀ over its
B_r kept positions, so S_r²/B_r is one draw of the Gauss-Newton-Bartlett estimate B·ĝ⊙ĝ per
head; its exact mean is (1/B_r)·Σ_i Λ_i x_i², Λ the per-position loss's Hessian in f (1/σ²,
p(1 − p) of the softmax or the sigmoid), computed in float64 from the very inputs and
outputs of the low-precision forward. The mean over R heads must lie within 6 standard errors
(plus 3% for the low-precision gradient) of the exact mean at every weight.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sophia_pytorch import (
    SophiaG,
    sampled_binary_cross_entropy,
    sampled_cross_entropy,
    sampled_gaussian_nll,
)
from sophia_pytorch.refresh import gauss_newton_bartlett

HEADS = 600  # R draws, one backward
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _draw(loss: str, dtype: torch.dtype, magnitude: float, positions: int, outputs: int,
          inputs: int, keep_share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate, exact), each (R, outputs, inputs) in float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(HEADS, positions, inputs, generator=generator).to(dtype)
    weights = (torch.randn(HEADS, outputs, inputs, generator=generator) * 0.5).requires_grad_()
    mask = torch.rand(HEADS, positions, generator=generator) < keep_share
    mask[:, 0] = True  # every head keeps a position
    f = torch.einsum("rbk,rdk->rbd", x, weights.to(dtype)) + torch.tensor(magnitude, dtype=dtype)
    if loss == "gaussian":
        mean, count = sampled_gaussian_nll(f, mask=mask, generator=generator)
        curvature = torch.ones_like(f, dtype=torch.float64)
    elif loss == "bernoulli":
        mean, count = sampled_binary_cross_entropy(f, mask=mask, generator=generator)
        p = torch.sigmoid(f.detach().double())
        curvature = p * (1 - p)
    else:
        mean, count = sampled_cross_entropy(f, mask=mask, generator=generator)
        p = torch.softmax(f.detach().double(), dim=-1)
        curvature = p * (1 - p)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (mean * count).backward()
    kept = mask.sum(1).double()[:, None, None]  # B_r
    estimate = weights.grad.double() ** 2 / kept
    x64 = x.double() * mask[..., None]
    exact = torch.einsum("rbd,rbk->rdk", curvature * mask[..., None], x64 ** 2) / kept
    return estimate, exact


@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(loss=st.sampled_from(["gaussian", "bernoulli", "cross_entropy"]),
       dtype=st.sampled_from(sorted(DTYPES)),
       magnitude=st.sampled_from([0.0, 3.0, 1000.0, 3000.0, 30000.0]),
       positions=st.integers(1, 6), outputs=st.integers(2, 4), inputs=st.integers(1, 3),
       keep_share=st.sampled_from([0.3, 1.0]), seed=st.integers(0, 2**16))
def test_the_sampled_losses_mean_is_the_gauss_newton_diagonal_in_every_dtype(
        loss, dtype, magnitude, positions, outputs, inputs, keep_share, seed):
    if loss != "gaussian":
        magnitude = min(magnitude, 3.0)  # a saturated softmax/sigmoid has no curvature left
    estimate, exact = _draw(loss, DTYPES[dtype], magnitude, positions, outputs, inputs,
                            keep_share, seed)
    error = estimate - exact  # per head: mean 0 if the estimate is unbiased
    mean_error = error.mean(0)
    standard_error = error.std(0) / HEADS ** 0.5
    slack = 0.03 * exact.mean(0) if dtype != "float32" else 0.0
    assert (mean_error.abs() <= 6 * standard_error + slack + 1e-12).all(), (
        f"{loss} {dtype} |f|≈{magnitude}: mean estimate / exact = "
        f"{(estimate.mean(0) / exact.mean(0)).flatten().tolist()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("magnitude", [1000.0, 3000.0, 30000.0])
def test_a_gaussian_draw_keeps_its_noise_when_the_outputs_are_large(dtype, magnitude):
    """ŷ = f + σ·noise rounded to bf16 at |f| = 3000 was f itself: the estimate was 0."""
    predictions = torch.full((4096, 1), magnitude, dtype=dtype, requires_grad=True)
    mean, count = sampled_gaussian_nll(predictions, generator=torch.Generator().manual_seed(0))
    (mean * count).backward()
    residual_squared = predictions.grad.double().pow(2).mean()  # E[ε²] = σ² = 1
    assert residual_squared == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("variance", [0.0, -1.0, float("nan"), float("inf")])
def test_a_tensor_variance_must_be_finite_and_positive_as_a_number_must(variance):
    predictions = torch.zeros(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="variance"):
        sampled_gaussian_nll(predictions, variance=variance)
    with pytest.raises(ValueError, match="variance must hold finite values > 0"):
        sampled_gaussian_nll(predictions, variance=torch.tensor([1.0, variance]))


def test_a_variance_that_does_not_broadcast_names_both_shapes():
    with pytest.raises(ValueError, match=r"variance of shape \(3,\) does not broadcast to the "
                                         r"predictions' shape \(5, 2\)"):
        sampled_gaussian_nll(torch.zeros(5, 2), variance=torch.ones(3))


def test_integer_logits_are_refused_as_the_other_losses_refuse_them():
    with pytest.raises(ValueError, match="floating-point logits"):
        sampled_cross_entropy(torch.zeros(3, 4, dtype=torch.int64))


def _refreshed_hessian(dtype: torch.dtype, positions: int, grad_scale: float | None,
                       mask: torch.Tensor | None = None) -> tuple[bool, torch.Tensor, SophiaG]:
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 8)
    optimizer = SophiaG(head.parameters(), lr=1e-3, fused=False)
    x = torch.randn(positions, 4)

    def chunk():
        with torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else \
                torch.autocast("cpu", enabled=False):
            return head(x).to(dtype), mask

    folded = gauss_newton_bartlett(optimizer, [chunk], generator=torch.Generator().manual_seed(1),
                                   grad_scale=grad_scale)
    return folded, optimizer.state[head.weight].get("hessian", torch.zeros(())), optimizer


@pytest.mark.parametrize("grad_scale", [None, 1024.0])
def test_a_float16_refresh_of_65520_positions_keeps_its_count_finite(grad_scale):
    """16 × 4096 positions: the count cast to float16 was inf (NaN h, or every refresh
    skipped under a loss scale)."""
    folded, hessian, _ = _refreshed_hessian(torch.float16, 65_520, grad_scale)
    _, reference, _ = _refreshed_hessian(torch.float32, 65_520, None)
    assert folded and hessian.isfinite().all() and hessian.abs().sum() > 0
    if grad_scale is not None:  # unscaled, float16 gradients of 1/65520 a position underflow
        torch.testing.assert_close(hessian.sum(), reference.sum(), rtol=0.05, atol=0)


def test_a_refresh_with_every_position_masked_is_skipped_not_counted():
    mask = torch.zeros(16, dtype=torch.bool)
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 8)
    optimizer = SophiaG(head.parameters(), lr=1e-3, fused=False)
    x = torch.randn(16, 4)
    head(x).sum().backward()
    optimizer.step()  # state exists, h = 0
    first = gauss_newton_bartlett(optimizer, [lambda: (head(x), torch.ones(16, dtype=torch.bool))],
                                  generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in optimizer.state[head.weight].items()}
    skipped = gauss_newton_bartlett(optimizer, [lambda: (head(x), mask)] * 2,
                                    generator=torch.Generator().manual_seed(2))
    assert first and not skipped
    for key, value in optimizer.state[head.weight].items():
        assert torch.equal(value, before[key]), key  # h not shrunk, no refresh counted
    assert all(p.grad is None for p in head.parameters())


def test_a_custom_sampled_loss_may_return_its_count_as_an_int():
    head = torch.nn.Linear(4, 8)
    optimizer = SophiaG(head.parameters(), lr=1e-3, fused=False)
    x = torch.randn(16, 4)

    def my_loss(outputs, *, mask, generator, count_as_tensor):
        loss, count = sampled_cross_entropy(outputs, generator=generator)
        return loss, count  # an int

    assert gauss_newton_bartlett(optimizer, [lambda: (head(x), None)], loss=my_loss)

    def broken(outputs, *, mask, generator, count_as_tensor):
        return outputs.sum()

    with pytest.raises(TypeError, match="must return \\(loss, count\\)"):
        gauss_newton_bartlett(optimizer, [lambda: (head(x), None)], loss=broken)


def test_a_refresh_of_an_optimizer_with_only_frozen_parameters_is_a_clear_error():
    head = torch.nn.Linear(4, 8)
    optimizer = SophiaG(head.parameters(), lr=1e-3, fused=False)
    head.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        gauss_newton_bartlett(optimizer, [lambda: (head(torch.randn(3, 4)), None)])
