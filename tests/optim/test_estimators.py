"""The Hessian-diagonal estimators: unbiased for what they claim, against exact values.

Monte-Carlo tests draw N estimates from seeded generators (so they are deterministic) and accept
a deviation of the sample mean from the exact value of at most 5 standard errors per coordinate
(two-sided probability of a false alarm ≈ 6e-7 per coordinate for a fresh seed).
"""

from __future__ import annotations

import pytest
import torch

import sophia_pytorch
from tests.optim.reference import (
    torch_on_one_thread,  # noqa: F401  (autouse fixture)
)

# ----------------------------------------------------------------------------- Gauss-Newton


def _softmax_regression(num_samples: int = 6, dim: int = 4, classes: int = 3):
    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(num_samples, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    bias = torch.randn(classes, generator=generator, dtype=torch.float64)
    return inputs, weight.requires_grad_(), bias.requires_grad_()


def _exact_gauss_newton_diagonal(inputs, weight, bias):
    """diag of the Gauss-Newton matrix of the mean loss L = (1/B)·Σ_i CE(z_i, y_i), z_i = W·x_i + b.

    Per sample, GN_i = J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i with J_i = ∂z_i/∂θ and p_i = softmax(z_i);
    for the mean loss GN = (1/B)·Σ_i GN_i. Here ∂z_ic'/∂W_cd = δ_cc'·x_id and ∂z_ic'/∂b_c = δ_cc',
    so diag(GN)[W_cd] = (1/B)·Σ_i x_id²·p_ic(1 − p_ic) and diag(GN)[b_c] = (1/B)·Σ_i p_ic(1 − p_ic).

    Why E[B·ĝ⊙ĝ] equals it: with labels ŷ_i ~ p_i, ĝ = (1/B)·Σ_i v_i, v_i = J_iᵀ(p_i − e_ŷi).
    The v_i are independent with E[v_i] = 0 (E[e_ŷ] = p) and
    E[v_i v_iᵀ] = J_iᵀ(diag(p_i) − p_i p_iᵀ)J_i. Cross terms vanish, so
    E[ĝ_k²] = (1/B²)·Σ_i E[v_ik²] and E[B·ĝ_k²] = (1/B)·Σ_i GN_i,kk.
    """
    with torch.no_grad():
        p = torch.softmax(inputs @ weight.T + bias, dim=-1)
        variance = p * (1 - p)
        return variance.T @ inputs.pow(2) / len(inputs), variance.mean(0)


def test_gnb_refresh_is_unbiased_for_the_gauss_newton_diagonal():
    """SophiaG with β2 = 0 (so h = ĥ after a refresh) refreshed from ``sampled_cross_entropy``
    with ``scale=num_samples``, 3000 times: the mean of h is the exact Gauss-Newton diagonal."""
    inputs, weight, bias = _softmax_regression()
    exact = _exact_gauss_newton_diagonal(inputs, weight, bias)
    optimizer = sophia_pytorch.SophiaG([weight, bias], betas=(0.9, 0.0))
    generator = torch.Generator().manual_seed(12)
    draws = 3000
    totals = [torch.zeros_like(weight), torch.zeros_like(bias)]
    squares = [torch.zeros_like(weight), torch.zeros_like(bias)]
    for _ in range(draws):
        optimizer.zero_grad()
        loss, num_samples = sophia_pytorch.sampled_cross_entropy(
            inputs @ weight.T + bias, generator=generator)
        loss.backward()
        optimizer.update_hessian(scale=num_samples)
        for total, square, p in zip(totals, squares, (weight, bias), strict=True):
            estimate = optimizer.state[p]["hessian"]
            total += estimate
            square += estimate * estimate
    assert num_samples == len(inputs)
    for total, square, target in zip(totals, squares, exact, strict=True):
        mean = total / draws
        standard_error = ((square / draws - mean * mean) / draws).sqrt()
        assert (standard_error < 0.1 * target).all(), "too few draws to tell anything"
        assert ((mean - target).abs() <= 5 * standard_error).all(), (mean, target)


def test_sampled_labels_follow_the_models_softmax():
    """20000 positions with the same logits: the label frequencies are softmax(logits) within 5
    standard errors. Labels are read back from the gradient: B·∂L/∂z_i = p_i − e_ŷi."""
    row = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    logits = row.repeat(20000, 1).requires_grad_()
    loss, num_samples = sophia_pytorch.sampled_cross_entropy(
        logits, generator=torch.Generator().manual_seed(13))
    loss.backward()
    p = torch.softmax(row, dim=-1)
    one_hot = p - num_samples * logits.grad
    torch.testing.assert_close(one_hot.sum(-1), torch.ones(20000, dtype=torch.float64))
    assert ((one_hot - one_hot.round()).abs() < 1e-9).all()
    frequencies = one_hot.round().mean(0)
    standard_error = (p * (1 - p) / num_samples).sqrt()
    assert ((frequencies - p).abs() <= 5 * standard_error).all(), (frequencies, p)


def _kept_labels_and_check_gradient(logits, loss, num_samples, keep):
    """Read the drawn labels back from ∂loss/∂logits, asserting its structure on the way:
    zero rows where ``keep`` is False, (p − e_ŷ)/B rows where it is True."""
    flat_grad = logits.grad.reshape(-1, logits.shape[-1])
    flat_keep = keep.reshape(-1)
    assert (flat_grad[~flat_keep] == 0).all()
    p = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]), dim=-1)[flat_keep]
    one_hot = p - num_samples * flat_grad[flat_keep]
    assert ((one_hot - one_hot.round()).abs() < 1e-9).all()
    assert (one_hot.round().sum(-1) == 1).all()
    return one_hot.round().argmax(-1)


def test_mask_and_ignored_targets_leave_positions_out_of_the_mean():
    """Positions with mask False or target == ignore_index get no gradient, are not counted in
    num_samples, and the loss is the mean cross-entropy over the other positions."""
    generator = torch.Generator().manual_seed(14)
    logits = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 4, (3, 5), generator=generator)
    targets[0, 1] = targets[2, 4] = targets[1, 0] = -100
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2] = mask[2, 4] = mask[0, 0] = False
    keep = (targets != -100) & mask
    loss, num_samples = sophia_pytorch.sampled_cross_entropy(
        logits, targets=targets, mask=mask, generator=generator)
    assert num_samples == int(keep.sum()) == 15 - 5
    loss.backward()
    labels = _kept_labels_and_check_gradient(logits, loss, num_samples, keep)
    kept_log_probs = torch.log_softmax(logits.detach(), dim=-1)[keep]
    expected = -kept_log_probs.gather(1, labels[:, None]).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)


def test_custom_ignore_index_selects_the_positions_left_out():
    generator = torch.Generator().manual_seed(15)
    logits = torch.randn(8, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 7, 2, 7, 7, 1, -100, 0])
    loss, num_samples = sophia_pytorch.sampled_cross_entropy(
        logits, targets=targets, ignore_index=7, generator=generator)
    assert num_samples == 5  # -100 is an ordinary target value when ignore_index is 7
    loss.backward()
    _kept_labels_and_check_gradient(logits, loss, num_samples, targets != 7)


def test_sampled_cross_entropy_with_a_seeded_generator_is_reproducible():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(16))
    draws = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        loss, num_samples = sophia_pytorch.sampled_cross_entropy(
            x, generator=torch.Generator().manual_seed(17))
        loss.backward()
        draws.append((loss.detach(), num_samples, x.grad))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1] == draws[1][1]
    assert torch.equal(draws[0][2], draws[1][2])
    x = logits.clone().requires_grad_()
    other, _ = sophia_pytorch.sampled_cross_entropy(x, generator=torch.Generator().manual_seed(18))
    assert not torch.equal(other.detach(), draws[0][0])


@pytest.mark.parametrize("selector", ["mask", "targets"])
def test_sampled_cross_entropy_with_every_position_left_out_raises(selector):
    logits = torch.randn(2, 3, 5)
    kwargs = ({"mask": torch.zeros(2, 3, dtype=torch.bool)} if selector == "mask"
              else {"targets": torch.full((2, 3), -100)})
    with pytest.raises(ValueError, match="masked"):
        sophia_pytorch.sampled_cross_entropy(logits, **kwargs)


# ------------------------------------------------------------------------------- Hutchinson


def _tanh_mlp():
    """A 3-4-1 tanh MLP with squared error on 5 samples, float64: parameters, closure, and the
    exact Hessian of the loss in the flattened parameters (torch.autograd.functional.hessian)."""
    generator = torch.Generator().manual_seed(21)
    inputs = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(5, generator=generator, dtype=torch.float64)
    shapes = [(4, 3), (4,), (1, 4), (1,)]
    params = [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_()
              for s in shapes]

    def loss_of(w1, b1, w2, b2):
        prediction = (torch.tanh(inputs @ w1.T + b1) @ w2.T + b2).squeeze(-1)
        return (prediction - targets).pow(2).mean()

    def flat_loss(vector):
        pieces, offset = [], 0
        for shape in shapes:
            size = torch.Size(shape).numel()
            pieces.append(vector[offset:offset + size].reshape(shape))
            offset += size
        return loss_of(*pieces)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(flat_loss, flat)
    return params, (lambda: loss_of(*params)), hessian


def _assert_unbiased_for_hessian_diagonal(draw, params, hessian, draws: int) -> None:
    """Mean of ``draws`` flattened estimates vs diag(H), within 5 standard errors; the variance
    of u⊙(H·u) at coordinate k is exactly Σ_{j≠k} H_kj² for Rademacher u."""
    diagonal = hessian.diagonal()
    standard_error = ((hessian.pow(2).sum(1) - diagonal.pow(2)) / draws).sqrt()
    total = torch.zeros_like(diagonal)
    for _ in range(draws):
        total += torch.cat([e.reshape(-1) for e in draw()])
    mean = total / draws
    assert ((mean - diagonal).abs() <= 5 * standard_error + 1e-12).all(), (mean, diagonal)
    # Informative: the large curvatures are pinned down to a fraction of their size.
    large = diagonal.abs() > 0.2 * diagonal.abs().max()
    assert (5 * standard_error[large] < 0.5 * diagonal.abs()[large]).all()


def test_hutchinson_estimate_is_unbiased_for_the_exact_hessian_diagonal():
    params, closure, hessian = _tanh_mlp()
    generator = torch.Generator().manual_seed(22)
    _assert_unbiased_for_hessian_diagonal(
        lambda: sophia_pytorch.hutchinson_estimate(closure, params, generator=generator),
        params, hessian, draws=1500)


def test_sophiah_refresh_is_unbiased_for_the_exact_hessian_diagonal():
    """SophiaH with β2 = 0, so h after ``update_hessian`` is the estimate itself."""
    params, closure, hessian = _tanh_mlp()
    optimizer = sophia_pytorch.SophiaH(params, betas=(0.9, 0.0))
    generator = torch.Generator().manual_seed(23)

    def draw():
        optimizer.update_hessian(closure, generator=generator)
        return [optimizer.state[p]["hessian"] for p in params]

    _assert_unbiased_for_hessian_diagonal(draw, params, hessian, draws=1500)


def test_hutchinson_estimate_leaves_grads_alone_and_gives_zeros_for_unused_parameters():
    params, closure, _ = _tanh_mlp()
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    marker = torch.full((4, 3), 7.0, dtype=torch.float64)
    params[0].grad = marker.clone()
    estimates = sophia_pytorch.hutchinson_estimate(
        closure, [*params, unused], generator=torch.Generator().manual_seed(24))
    assert torch.equal(params[0].grad, marker) and params[1].grad is None
    assert torch.equal(estimates[-1], torch.zeros(3, dtype=torch.float64))
    assert [e.shape for e in estimates] == [p.shape for p in [*params, unused]]


def test_sophiah_refresh_returns_true_when_folded_like_sophiag():
    params, closure, _ = _tanh_mlp()
    assert sophia_pytorch.SophiaH(params).update_hessian(closure) is True


def test_sophiah_refresh_gives_no_state_to_parameters_outside_the_loss():
    """A parameter the loss does not depend on gets no gradient and, like in torch.optim, no
    state: the refresh must not create (zero) m, h and step entries for it."""
    used = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    unused = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    optimizer = sophia_pytorch.SophiaH([used, unused])
    optimizer.update_hessian(lambda: (used**4).sum())
    assert used in optimizer.state
    assert unused not in optimizer.state


def test_rademacher_probes_are_plus_or_minus_one_with_equal_odds():
    like = torch.empty(100, 100, dtype=torch.float64)
    probes = sophia_pytorch.rademacher_like(like, torch.Generator().manual_seed(25))
    assert probes.shape == like.shape and probes.dtype == like.dtype
    assert ((probes == 1) | (probes == -1)).all()
    assert abs(float(probes.mean())) < 5 / 100  # 5 standard errors of a mean of 10⁴ signs


def test_hutchinson_estimate_of_a_loss_linear_in_the_parameters_is_zero():
    """L = Σ w⊙x + c·b has a zero Hessian; the estimate is zeros, not an error (no gradient of
    a linear loss carries a graph, so there is no Hessian-vector product to take)."""
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(1, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    estimates = sophia_pytorch.hutchinson_estimate(lambda: (w * x).sum() + 3 * b.sum(), [w, b])
    assert torch.equal(estimates[0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(estimates[1], torch.zeros(1, dtype=torch.float64))
