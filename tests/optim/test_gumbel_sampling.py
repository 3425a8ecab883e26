"""``sampled_cross_entropy`` draws by Gumbel-max: the softmax's distribution, masks respected,
the count as a tensor, nothing that breaks a compiled graph.

The drawn labels are read back from the gradient, B·∂L/∂z_i = p_i − e_ŷi (the estimator's own
contract), so the tests see exactly what a Hessian refresh back-propagates. Frequencies are
checked per class within 5 standard errors and by a chi-square test at a false-alarm rate of
1e-6 (the seeds are fixed, so the outcome is deterministic).
"""

from __future__ import annotations

import math

import pytest
import torch

from sophia_pytorch import sampled_cross_entropy


def _drawn_labels(logits: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(labels, keep, num_samples) of one draw over float64 ``logits``: labels of the kept rows,
    read from the gradient; asserts that the rows left out carry no gradient at all."""
    leaf = logits.detach().clone().requires_grad_()
    loss, num_samples = sampled_cross_entropy(leaf, **kwargs)
    loss.backward()
    flat_grad = leaf.grad.reshape(-1, leaf.shape[-1])
    keep = flat_grad.abs().sum(-1) > 0
    p = torch.softmax(leaf.detach().reshape(-1, leaf.shape[-1]).double(), dim=-1)
    one_hot = p[keep] - int(num_samples) * flat_grad[keep].double()
    assert ((one_hot - one_hot.round()).abs() < 1e-6).all()
    assert (one_hot.round().sum(-1) == 1).all()
    return one_hot.round().argmax(-1), keep, num_samples


def _chi_square_bound(degrees_of_freedom: int, z: float = 4.753) -> float:
    """The chi-square quantile at 1 − 1e-6 (z: the normal's), by Wilson-Hilferty."""
    k = degrees_of_freedom
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def _assert_follows(labels: torch.Tensor, p: torch.Tensor) -> None:
    n = len(labels)
    counts = torch.bincount(labels, minlength=len(p)).double()
    frequencies = counts / n
    standard_error = (p * (1 - p) / n).sqrt()
    assert ((frequencies - p).abs() <= 5 * standard_error).all(), (frequencies, p)
    chi_square = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi_square < _chi_square_bound(len(p) - 1), chi_square


@pytest.mark.parametrize("shift", [0.0, 40.0])
def test_gumbel_max_draw_has_the_softmax_distribution(shift):
    """200 000 rows of the same logits, one of them a rare class (p ≈ 2e-4): frequencies are
    softmax(logits); a large common shift (exp overflows float32 beyond ~88) changes nothing."""
    row = torch.tensor([0.5, -1.0, 2.0, 0.0, -6.0, 1.2, -0.3, 0.9], dtype=torch.float64) + shift
    logits = row.repeat(200_000, 1)
    labels, keep, _ = _drawn_labels(logits, generator=torch.Generator().manual_seed(31))
    assert keep.all()
    _assert_follows(labels, torch.softmax(row, dim=-1))


def test_gumbel_max_draw_from_bfloat16_logits_follows_their_softmax():
    """Low-precision logits are drawn from in float32: the distribution is the softmax of the
    bf16 values themselves."""
    row = torch.tensor([1.0, -0.5, 0.25, 2.5], dtype=torch.bfloat16)
    leaf = row.repeat(100_000, 1).requires_grad_()
    loss, num_samples = sampled_cross_entropy(leaf, generator=torch.Generator().manual_seed(32))
    loss.backward()
    p = torch.softmax(row.double(), dim=-1)
    # bf16 gradients cannot be read back exactly; the label is the row's negative entry.
    labels = leaf.grad.float().argmin(-1)
    # The mean is taken in float32 (a float16 sum of many positions overflows; so does the
    # gradient a loss scale puts on a float16 mean).
    assert num_samples == 100_000 and loss.dtype == torch.float32
    _assert_follows(labels, p)


def test_each_row_is_drawn_from_its_own_softmax():
    """Interleaved rows with different logits: each row's labels follow its own softmax (the
    noise is independent across rows and classes, not shared)."""
    rows = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    logits = rows.repeat(40_000, 1)
    labels, _, _ = _drawn_labels(logits, generator=torch.Generator().manual_seed(33))
    for index, row in enumerate(rows):
        _assert_follows(labels[index::3], torch.softmax(row, dim=-1))


@pytest.mark.parametrize("count_as_tensor", [False, True])
def test_masked_positions_are_never_sampled(count_as_tensor):
    """Positions left out by ``mask`` or ``targets == ignore_index`` get no label (no gradient),
    even where their logits make one class certain; B counts the others."""
    generator = torch.Generator().manual_seed(34)
    logits = torch.randn(64, 9, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 5, (64, 9), generator=generator)
    targets[:, -1] = -100                            # e.g. the shifted-away last position
    mask = torch.rand(64, 9, generator=generator) > 0.3
    expected_keep = (mask & (targets != -100)).reshape(-1)
    logits[~(mask & (targets != -100))] = torch.tensor([60.0, -60.0, -60.0, -60.0, -60.0],
                                                       dtype=torch.float64)
    _, keep, num_samples = _drawn_labels(
        logits, targets=targets, mask=mask, generator=generator, count_as_tensor=count_as_tensor)
    assert torch.equal(keep, expected_keep)
    assert int(num_samples) == int(expected_keep.sum())


def test_count_as_tensor_gives_the_same_draw_and_a_zero_dim_count():
    logits = torch.randn(6, 7, 11, generator=torch.Generator().manual_seed(35))
    mask = torch.rand(6, 7, generator=torch.Generator().manual_seed(36)) > 0.5
    as_int = sampled_cross_entropy(logits, mask=mask, generator=torch.Generator().manual_seed(37))
    as_tensor = sampled_cross_entropy(
        logits, mask=mask, generator=torch.Generator().manual_seed(37), count_as_tensor=True)
    assert isinstance(as_int[1], int)
    assert as_tensor[1].dim() == 0 and as_tensor[1].dtype == torch.int64
    assert int(as_tensor[1]) == as_int[1] == int(mask.sum())
    torch.testing.assert_close(as_tensor[0], as_int[0], rtol=1e-6, atol=0)


def test_count_as_tensor_with_every_position_masked_gives_zero_loss_and_gradient():
    """No host sync means no raise: the loss is 0 and back-propagates nothing."""
    logits = torch.randn(3, 4, 6, requires_grad=True)
    loss, count = sampled_cross_entropy(
        logits, mask=torch.zeros(3, 4, dtype=torch.bool), count_as_tensor=True)
    loss.backward()
    assert int(count) == 0 and float(loss.detach()) == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_the_draw_uses_the_given_generator_only():
    """With a generator, the global RNG is untouched (dropout, data order stay where they were)
    and the same seed gives the same labels."""
    logits = torch.randn(128, 10, generator=torch.Generator().manual_seed(38))
    before = torch.get_rng_state()
    first, _, _ = _drawn_labels(logits, generator=torch.Generator().manual_seed(39))
    assert torch.equal(torch.get_rng_state(), before)
    second, _, _ = _drawn_labels(logits, generator=torch.Generator().manual_seed(39))
    other, _, _ = _drawn_labels(logits, generator=torch.Generator().manual_seed(40))
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_sampled_cross_entropy_compiles_into_one_graph():
    """``fullgraph=True`` fails on any graph break (a host read such as ``int(count)``);
    aot_eager traces forward and backward without building a kernel, so the test stays fast."""
    torch._dynamo.reset()

    def refresh_loss(logits, mask):
        loss, count = sampled_cross_entropy(logits, mask=mask, count_as_tensor=True)
        return loss * count

    compiled = torch.compile(refresh_loss, fullgraph=True, backend="aot_eager")
    logits = torch.randn(4, 5, 7, requires_grad=True)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, :2] = False
    out = compiled(logits, mask)
    out.backward()
    assert torch.isfinite(out) and logits.grad[0, :2].abs().sum() == 0
    assert logits.grad[1:].abs().sum() > 0
