"""End to end: small real models train with SophiaG (GNB refresh) and SophiaH (Hutchinson
refresh) in the plain loop the docs describe, refreshing whenever ``hessian_due()`` says so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sophia_pytorch
from tests.optim.reference import (
    torch_on_one_thread,  # noqa: F401  (autouse fixture)
)


def _refresh(optimizer, model, inputs, targets, generator) -> None:
    """One Hessian refresh of either kind, on the current batch."""
    if isinstance(optimizer, sophia_pytorch.SophiaG):
        optimizer.zero_grad()
        loss, num_samples = sophia_pytorch.sampled_cross_entropy(model(inputs), generator=generator)
        loss.backward()
        optimizer.update_hessian(scale=num_samples)
    else:
        optimizer.update_hessian(
            lambda: F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten()),
            generator=generator)


def _train(model, optimizer, batches) -> tuple[float, float]:
    """Returns the mean loss of the first and of the last 10 batches."""
    generator = torch.Generator().manual_seed(7)
    losses = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if optimizer.hessian_due():
            _refresh(optimizer, model, inputs, targets, generator)
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10


def _mlp_classifier_batches(steps: int):
    """Full batches of 512 points in 10 dimensions labelled by a noisy random linear teacher."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 10, generator=generator)
    logits = inputs @ torch.randn(10, 4, generator=generator)
    targets = (logits + 0.3 * torch.randn(512, 4, generator=generator)).argmax(-1)
    return [(inputs, targets)] * steps


@pytest.mark.parametrize("name", ["SophiaG", "SophiaH"])
def test_mlp_classifier_loss_halves(name):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    optimizer = getattr(sophia_pytorch, name)(model.parameters(), lr=3e-3)
    first, last = _train(model, optimizer, _mlp_classifier_batches(300))
    assert last < 0.5 * first, (first, last)
    # The curvature was in use: some coordinates took a preconditioned, unclipped step.
    assert optimizer.unclipped_fraction() > 0


TEXT = "the quick brown fox jumps over the lazy dog. " * 20
VOCAB = sorted(set(TEXT))


class _TinyCharTransformer(torch.nn.Module):
    """One pre-norm block (causal SDPA attention and an MLP) over 16 characters."""

    def __init__(self, width: int = 32, context: int = 16) -> None:
        super().__init__()
        self.token = torch.nn.Embedding(len(VOCAB), width)
        self.position = torch.nn.Embedding(context, width)
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))
        self.head = torch.nn.Linear(width, len(VOCAB))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.token(tokens) + self.position(torch.arange(tokens.shape[1]))
        q, k, v = (t.unsqueeze(1) for t in self.qkv(self.norm1(h)).chunk(3, dim=-1))
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1))
        h = h + self.mlp(self.norm2(h))
        return self.head(h)


def _char_batches(steps: int, context: int = 16, batch_size: int = 32):
    ids = torch.tensor([VOCAB.index(c) for c in TEXT])
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - context - 1, (batch_size,), generator=generator)
        batches.append((torch.stack([ids[s:s + context] for s in starts]),
                        torch.stack([ids[s + 1:s + context + 1] for s in starts])))
    return batches


@pytest.mark.parametrize("name", ["SophiaG", "SophiaH"])
def test_tiny_char_transformer_loss_halves(name):
    """SophiaH's refresh goes through F.scaled_dot_product_attention (math attention)."""
    torch.manual_seed(0)
    model = _TinyCharTransformer()
    optimizer = getattr(sophia_pytorch, name)(model.parameters(), lr=1e-2)
    first, last = _train(model, optimizer, _char_batches(100))
    assert last < 0.5 * first, (first, last)
