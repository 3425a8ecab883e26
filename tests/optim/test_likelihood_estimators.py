"""Sophia-G beyond the softmax: ``sampled_gaussian_nll`` (regression heads) and
``sampled_binary_cross_entropy`` (binary and multi-label heads) have the exact Gauss-Newton
diagonal as their mean, and a one-class softmax is refused instead of giving 0.

The reference is computed another way: the per-sample Jacobians J_i = ∂f_i/∂θ of a small
float64 tanh MLP by ``torch.func.jacrev``, and diag(GN) = (1/B)·Σ_i Σ_d Λ_id·J_idk² with
Λ = 1/σ² (Gaussian) or σ(f)(1 − σ(f)) (Bernoulli), the Hessians of the per-position losses in
the outputs. N = 20000 estimates B·ĝ⊙ĝ are averaged; the mean must lie within 5 standard
errors of the exact value at every coordinate (the seeds are fixed, so the outcome is
deterministic), and one refresh through SophiaG is checked to hold B·ĝ⊙ĝ of its draw.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev

import sophia_pytorch
from sophia_pytorch import (
    SophiaG,
    sampled_binary_cross_entropy,
    sampled_cross_entropy,
    sampled_gaussian_nll,
)
from tests.optim.reference import (
    torch_on_one_thread,  # noqa: F401  (autouse fixture)
)

SAMPLES, INPUTS, OUTPUTS = 5, 3, 2


def _mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(31)
    model = torch.nn.Sequential(torch.nn.Linear(INPUTS, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, OUTPUTS)).double()
    with torch.no_grad():  # outputs of a few units, where σ(f)(1 − σ(f)) varies
        model[2].weight.mul_(4)
        model[2].bias.copy_(torch.tensor([1.5, -2.0]))
    inputs = torch.randn(SAMPLES, INPUTS, generator=torch.Generator().manual_seed(32),
                         dtype=torch.float64)
    return model, inputs


def _jacobian_and_outputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """J of shape (B, D, P), all parameters flattened in order, and the outputs f (B, D)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def outputs(theta):
        return functional_call(model, theta, (inputs,))

    jacobians = jacrev(outputs)(params)  # name -> (B, D, *p.shape)
    flat = torch.cat([jacobians[name].flatten(2) for name in params], dim=2)
    with torch.no_grad():
        return flat, outputs(params)


def _exact_gauss_newton_diagonal(model, inputs, curvature) -> torch.Tensor:
    """diag of (1/B)·Σ_i J_iᵀ diag(Λ_i) J_i, (P,); ``curvature(f)`` gives Λ shaped like f."""
    jacobian, outputs = _jacobian_and_outputs(model, inputs)
    return torch.einsum("id,idp->p", curvature(outputs), jacobian.pow(2)) / len(inputs)


def _assert_mean_of_estimates_is(exact, model, inputs, sampled_loss, draws=20000, seed=33):
    """N independent refreshes in one call: the outputs repeated N times, so that each of the
    N·B positions gets its own draw; draw n's ĝ_n = (1/B)·Σ_i J_iᵀ·(B·N·∂L/∂f_ni) is the
    gradient its own refresh would back-propagate, and ĥ_n = B·ĝ_n⊙ĝ_n."""
    jacobian, outputs = _jacobian_and_outputs(model, inputs)
    stacked = outputs.expand(draws, *outputs.shape).clone().requires_grad_()
    loss, num_samples = sampled_loss(stacked, generator=torch.Generator().manual_seed(seed))
    assert num_samples == draws * SAMPLES
    loss.backward()
    per_position = stacked.grad * num_samples  # ∂(per-position loss)/∂f, (N, B, D)
    gradients = torch.einsum("nid,idp->np", per_position, jacobian) / SAMPLES
    estimates = SAMPLES * gradients.pow(2)
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / draws**0.5
    informative = exact > 0.05 * exact.max()
    assert (standard_error[informative] < 0.05 * exact[informative]).all(), "too few draws"
    assert ((mean - exact).abs() <= 5 * standard_error + 1e-12).all(), (mean, exact)


def test_sophiag_refresh_from_a_sampled_loss_is_b_times_the_squared_mean_gradient():
    """The link to the optimizer: one refresh of SophiaG (β2 = 0) from the model's own forward
    holds B·ĝ⊙ĝ with ĝ = (1/B)·Σ_i J_iᵀ·∂ℓ_i/∂f_i of the same draw (same seed)."""
    model, inputs = _mlp()
    jacobian, outputs = _jacobian_and_outputs(model, inputs)
    for sampled_loss in (sampled_gaussian_nll, sampled_binary_cross_entropy):
        optimizer = SophiaG(model.parameters(), betas=(0.9, 0.0))
        optimizer.zero_grad()
        loss, num_samples = sampled_loss(model(inputs), generator=torch.Generator().manual_seed(3))
        loss.backward()
        assert optimizer.update_hessian(scale=num_samples) is True
        leaf = outputs.clone().requires_grad_()
        sampled_loss(leaf, generator=torch.Generator().manual_seed(3))[0].backward()
        gradient = torch.einsum("id,idp->p", leaf.grad, jacobian)
        h = torch.cat([optimizer.state[p]["hessian"].reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(h, num_samples * gradient.pow(2), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("variance", [1.0, 0.25])
def test_gaussian_refresh_is_unbiased_for_the_gauss_newton_diagonal(variance):
    model, inputs = _mlp()
    exact = _exact_gauss_newton_diagonal(
        model, inputs, lambda f: torch.full_like(f, 1 / variance))
    _assert_mean_of_estimates_is(
        exact, model, inputs,
        lambda f, generator: sampled_gaussian_nll(f, variance=variance, generator=generator))


def test_gaussian_refresh_with_per_output_variances():
    model, inputs = _mlp()
    variance = torch.tensor([0.5, 2.0], dtype=torch.float64)
    exact = _exact_gauss_newton_diagonal(model, inputs, lambda f: (1 / variance).expand_as(f))
    _assert_mean_of_estimates_is(
        exact, model, inputs,
        lambda f, generator: sampled_gaussian_nll(f, variance=variance, generator=generator))


def test_bernoulli_refresh_is_unbiased_for_the_gauss_newton_diagonal():
    model, inputs = _mlp()
    exact = _exact_gauss_newton_diagonal(
        model, inputs, lambda f: torch.sigmoid(f) * (1 - torch.sigmoid(f)))
    _assert_mean_of_estimates_is(exact, model, inputs, sampled_binary_cross_entropy)


@pytest.mark.parametrize("sampled_loss", [sampled_gaussian_nll, sampled_binary_cross_entropy])
def test_mask_leaves_positions_out_of_the_mean_and_the_gradient(sampled_loss):
    generator = torch.Generator().manual_seed(34)
    outputs = torch.randn(3, 4, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4, generator=generator) < 0.6
    mask[0, 0], mask[1, 1] = True, False
    loss, num_samples = sampled_loss(outputs, mask=mask, generator=torch.Generator().manual_seed(1))
    assert num_samples == int(mask.sum())
    loss.backward()
    assert (outputs.grad[~mask] == 0).all() and (outputs.grad[mask] != 0).all()
    # The kept positions' loss and gradient are those of the same draw without a mask.
    full = outputs.detach().clone().requires_grad_()
    full_loss, full_count = sampled_loss(full, generator=torch.Generator().manual_seed(1))
    full_loss.backward()
    torch.testing.assert_close(outputs.grad[mask] * num_samples, full.grad[mask] * full_count)


def test_gaussian_gradient_is_minus_the_drawn_noise_over_sigma():
    """B·∂L/∂f = (f − ŷ)/σ² = −ε/σ with ε ~ N(0, 1): mean 0 and variance 1/σ² per output."""
    predictions = torch.zeros(20000, 1, dtype=torch.float64, requires_grad=True)
    loss, num_samples = sampled_gaussian_nll(
        predictions, variance=4.0, generator=torch.Generator().manual_seed(35))
    loss.backward()
    scaled = (num_samples * predictions.grad).squeeze(-1)
    assert abs(float(scaled.mean())) < 5 * (0.25 / 20000) ** 0.5
    assert abs(float(scaled.var()) - 0.25) < 5 * 0.25 * (2 / 20000) ** 0.5


def test_bernoulli_draws_follow_the_sigmoid():
    """B·∂L/∂f = σ(f) − ŷ: the drawn ŷ read back are 0/1 with frequency σ(f)."""
    row = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    logits = row.repeat(20000, 1).requires_grad_()
    loss, num_samples = sampled_binary_cross_entropy(
        logits, generator=torch.Generator().manual_seed(36))
    loss.backward()
    drawn = torch.sigmoid(row) - num_samples * logits.grad
    assert ((drawn - drawn.round()).abs() < 1e-9).all()
    p = torch.sigmoid(row)
    assert ((drawn.round().mean(0) - p).abs() <= 5 * (p * (1 - p) / 20000).sqrt()).all()


@pytest.mark.parametrize("sampled_loss", [sampled_gaussian_nll, sampled_binary_cross_entropy])
def test_count_as_tensor_gives_the_same_draw_and_zero_when_all_masked(sampled_loss):
    outputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(37))
    as_int = sampled_loss(outputs, generator=torch.Generator().manual_seed(2))
    as_tensor = sampled_loss(outputs, generator=torch.Generator().manual_seed(2),
                             count_as_tensor=True)
    assert torch.equal(as_int[0], as_tensor[0]) and as_tensor[1].dim() == 0
    assert int(as_tensor[1]) == as_int[1] == 4
    leaf = outputs.clone().requires_grad_()
    nothing = torch.zeros(4, dtype=torch.bool)
    loss, count = sampled_loss(leaf, mask=nothing, count_as_tensor=True)
    loss.backward()
    assert float(loss.detach()) == 0 and int(count) == 0 and (leaf.grad == 0).all()
    with pytest.raises(ValueError, match="every one is masked"):
        sampled_loss(outputs, mask=nothing)


@pytest.mark.parametrize("sampled_loss", [sampled_gaussian_nll, sampled_binary_cross_entropy])
def test_outputs_without_a_last_output_dimension_are_refused_naming_unsqueeze(sampled_loss):
    with pytest.raises(ValueError, match=r"unsqueeze\(-1\)"):
        sampled_loss(torch.randn(8))


@pytest.mark.parametrize("variance", [0.0, -1.0, float("nan"), float("inf"), True])
def test_gaussian_variance_must_be_a_positive_number(variance):
    with pytest.raises(ValueError, match="variance"):
        sampled_gaussian_nll(torch.randn(4, 1), variance=variance)


def test_cross_entropy_of_one_class_is_refused_naming_the_regression_estimator():
    """(B, 1) logits: a softmax over one class is 1, so the estimate would be 0 forever."""
    with pytest.raises(ValueError, match="one class.*sampled_gaussian_nll.*'gaussian'"):
        sampled_cross_entropy(torch.randn(16, 1, requires_grad=True))


def test_the_estimators_are_exported():
    assert sophia_pytorch.sampled_gaussian_nll is sampled_gaussian_nll
    assert sophia_pytorch.sampled_binary_cross_entropy is sampled_binary_cross_entropy
    assert {"sampled_gaussian_nll", "sampled_binary_cross_entropy"} <= set(sophia_pytorch.__all__)
