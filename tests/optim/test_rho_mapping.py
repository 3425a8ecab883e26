"""ρ here is γ in levanter's Sophia (the implementation behind Wen et al. 2025's figures),
and what the gpt2-small preset's Sophia row rests on (``config.WEN_2025_130M_SOPHIA``).

Levanter's SophiaH keeps h = EMA of u⊙(∇²L·u), L the *mean* loss, with no batch factor, and
divides |m| by γ·h. Both h's here are on that scale: SophiaH's is the same estimator, and
SophiaG's ĥ = B·ĝ⊙ĝ has the Gauss-Newton diagonal of the mean loss as its mean for any refresh
batch B. On a linear softmax classifier the Gauss-Newton matrix *is* the Hessian (the logits are
linear in the weights), so there the three must agree: the mean of many SophiaG refreshes, the
mean of many SophiaH refreshes, and the float64 Hessian diagonal of the mean cross-entropy.
"""

from __future__ import annotations

import torch
from torch.func import hessian

from sophia_pytorch import SophiaG, SophiaH, sampled_cross_entropy

CLASSES, FEATURES, DRAWS = 4, 3, 4000


def _problem(positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(positions, FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randint(CLASSES, (positions,), generator=generator)
    weight = torch.randn(CLASSES, FEATURES, generator=generator, dtype=torch.float64)
    return x, y, weight


def _exact_hessian_diagonal(x, y, weight) -> torch.Tensor:
    def mean_loss(w):
        return torch.nn.functional.cross_entropy(x @ w.T, y)

    full = hessian(mean_loss)(weight).reshape(weight.numel(), weight.numel())
    return full.diagonal().reshape(weight.shape)


def _logits(x: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """(DRAWS, B, C): the classifier applied with each of DRAWS copies of the weights."""
    return torch.einsum("bf,rcf->rbc", x, stacked)


def _stacked(weight: torch.Tensor) -> torch.Tensor:
    """DRAWS copies of ``weight``: one refresh of the stack is DRAWS independent refreshes,
    since the loss is a sum over copies (its Hessian block-diagonal)."""
    return weight.expand(DRAWS, *weight.shape).clone().requires_grad_()


def _mean_sophiag_h(x, weight, generator) -> torch.Tensor:
    """The mean over DRAWS refreshes (β2 = 0: h is the estimate), each B·ĝ⊙ĝ of its copy."""
    stacked = _stacked(weight)
    optimizer = SophiaG([stacked], betas=(0.9, 0.0), fused=False)
    loss, count = sampled_cross_entropy(_logits(x, stacked), generator=generator)
    (loss * DRAWS).backward()  # each copy's gradient: that of its own mean over B positions
    optimizer.update_hessian(scale=count // DRAWS)
    return optimizer.state[stacked]["hessian"].mean(0)


def _mean_sophiah_h(x, y, weight, generator) -> torch.Tensor:
    stacked = _stacked(weight)
    optimizer = SophiaH([stacked], betas=(0.9, 0.0), fused=False)

    def summed_mean_losses() -> torch.Tensor:
        logits = _logits(x, stacked)
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.repeat(DRAWS)) * DRAWS

    optimizer.update_hessian(summed_mean_losses, generator=generator)
    return optimizer.state[stacked]["hessian"].mean(0)


def test_sophiag_and_sophiah_h_sit_on_levanters_scale_whatever_the_refresh_batch():
    for positions in (8, 64):  # h does not grow with the refresh batch: ρ needs no batch factor
        x, y, weight = _problem(positions)
        exact = _exact_hessian_diagonal(x, y, weight)
        g = _mean_sophiag_h(x, weight, torch.Generator().manual_seed(1))
        h = _mean_sophiah_h(x, y, weight, torch.Generator().manual_seed(2))
        # DRAWS estimates: within 10% of the exact diagonal at every weight (the Monte Carlo
        # error of a chi-square-like estimate of 4000 draws is about 2-3%).
        torch.testing.assert_close(g, exact, rtol=0.1, atol=0)
        torch.testing.assert_close(h, exact, rtol=0.1, atol=0)
