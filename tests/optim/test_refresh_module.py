"""``sophia_pytorch.refresh``: the one refresh, against references computed another way
(float64, the same draws replayed chunk by chunk, plain all-reduces of per-rank sums)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sophia_pytorch import SophiaG, sampled_cross_entropy, sampled_gaussian_nll
from sophia_pytorch import refresh as sophia_refresh
from tests._multiprocess import run_on_ranks
from tests.optim.reference import (
    torch_on_one_thread,  # noqa: F401  (autouse fixture)
)

CLASSES = 5


def _model(outputs: int = CLASSES) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, outputs)).double()


def _chunks_of(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three chunks of unequal sizes and masks; rank 1 keeps many more positions than rank 0."""
    generator = torch.Generator().manual_seed(10 + rank)
    chunks = []
    for rows, kept in ((4, 3 if rank == 0 else 4), (2, 1), (3, 0 if rank == 0 else 3)):
        inputs = torch.randn(rows, 4, generator=generator, dtype=torch.float64)
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[:kept] = True
        chunks.append((inputs, mask))
    return chunks


def _reference(model, chunks, loss_fn, seed, world_size=1) -> list[torch.Tensor]:
    """B·ĝ⊙ĝ, ĝ = S/B: S the gradient of the *sum* of the sampled losses over every kept
    position of every chunk (and rank), replaying the draws with a generator seeded alike."""
    generator = torch.Generator().manual_seed(seed)
    model.zero_grad()
    count = 0
    for inputs, mask in chunks:
        mean, kept = loss_fn(model(inputs), mask=mask, generator=generator, count_as_tensor=True)
        (mean * kept).backward()
        count += int(kept)
    sums = [p.grad.clone() for p in model.parameters()]
    total = torch.tensor(count)
    if world_size > 1:
        for tensor in [*sums, total]:
            dist.all_reduce(tensor)
    model.zero_grad(set_to_none=True)
    return [int(total) * (s / int(total)) ** 2 for s in sums]


def _refreshed(model, chunks, loss="cross_entropy", seed=100, **kwargs):
    optimizer = SophiaG(model.parameters(), betas=(0.9, 0.0))  # β2 = 0: h is the estimate
    folded = sophia_refresh.gauss_newton_bartlett(
        optimizer, [lambda c=c: (model(c[0]), c[1]) for c in chunks], loss=loss,
        generator=torch.Generator().manual_seed(seed), **kwargs)
    return folded, [optimizer.state[p]["hessian"] for p in model.parameters()]


@pytest.mark.parametrize("loss, outputs", [("cross_entropy", CLASSES), ("gaussian", 2)])
def test_chunks_of_unequal_sizes_give_the_mean_over_all_their_positions(loss, outputs):
    model, chunks = _model(outputs), _chunks_of(1)
    folded, hessians = _refreshed(model, chunks, loss=loss)
    reference = _reference(model, chunks, sophia_refresh.sampled_loss(loss), seed=100)
    assert folded and all(p.grad is None for p in model.parameters())
    for h, expected in zip(hessians, reference, strict=True):
        torch.testing.assert_close(h, expected, rtol=1e-6, atol=1e-14)  # N²/B in float32
        assert h.abs().sum() > 0


def test_one_chunk_passes_b_itself_as_the_scale():
    model, chunks = _model(), _chunks_of(1)[:1]
    optimizer = SophiaG(model.parameters(), betas=(0.9, 0.0))
    scales = []
    original = optimizer.update_hessian
    optimizer.update_hessian = lambda scale, **kw: scales.append(scale) or original(scale, **kw)
    sophia_refresh.gauss_newton_bartlett(optimizer, [lambda: (model(chunks[0][0]), chunks[0][1])])
    assert [int(s) for s in scales] == [int(chunks[0][1].sum())]
    assert scales[0].dtype == torch.int64  # a tensor: nothing waited for the device


def _refresh_on_rank(rank: int, world_size: int) -> dict:
    model, chunks = _model(), _chunks_of(rank)
    folded, hessians = _refreshed(model, chunks, seed=100 + rank)
    reference = _reference(model, chunks, sampled_cross_entropy, 100 + rank, world_size)
    return {"folded": folded, "hessians": [h.clone() for h in hessians],
            "reference": reference}


def test_two_ranks_with_unequal_counts_and_several_chunks_give_the_global_mean(tmp_path: Path):
    """Rank 0 keeps 4 positions in 3 chunks (one chunk empty), rank 1 keeps 8: h is B·ĝ⊙ĝ of
    the mean over all 12 on both ranks, bitwise alike."""
    runs = run_on_ranks(_refresh_on_rank, tmp_path)
    for run in runs:
        assert run["folded"]
        for h, expected in zip(run["hessians"], run["reference"], strict=True):
            torch.testing.assert_close(h, expected, rtol=1e-6, atol=1e-14)
    for h0, h1 in zip(runs[0]["hessians"], runs[1]["hessians"], strict=True):
        assert torch.equal(h0, h1)


def test_a_grad_scale_is_undone():
    model, chunks = _model(), _chunks_of(1)
    _, plain = _refreshed(model, chunks)
    plain = [h.clone() for h in plain]
    folded, scaled = _refreshed(model, chunks, grad_scale=2.0**12)
    assert folded
    for h, expected in zip(scaled, plain, strict=True):
        torch.testing.assert_close(h, expected, rtol=1e-12, atol=0)


def test_refresh_generator_is_a_pure_function_of_seed_key_and_rank():
    def draw(seed, key, rank=0):
        return torch.rand(4, generator=sophia_refresh.refresh_generator(seed, key, rank=rank))

    assert torch.equal(draw(3, 7), draw(3, 7)) and torch.equal(draw(3, 7, 1), draw(3, 7, 1))
    distinct = [draw(3, 7), draw(3, 8), draw(4, 7), draw(3, 7, 1), draw(3, 7, 2)]
    for i, a in enumerate(distinct):
        assert all(not torch.equal(a, b) for b in distinct[i + 1:])
    expected = torch.rand(4, generator=torch.Generator().manual_seed(3 * 1_000_003 + 7))
    assert torch.equal(draw(3, 7), expected)  # rank 0: the harness's seed of old


def test_sampled_loss_by_name_or_callable_and_a_clear_error_otherwise():
    assert sophia_refresh.sampled_loss("gaussian") is sampled_gaussian_nll
    assert sophia_refresh.sampled_loss(sampled_cross_entropy) is sampled_cross_entropy
    with pytest.raises(ValueError, match=r"unknown hessian_loss 'mse'.*bernoulli"):
        sophia_refresh.sampled_loss("mse")


def test_no_chunk_is_refused():
    with pytest.raises(ValueError, match="at least one chunk"):
        sophia_refresh.gauss_newton_bartlett(SophiaG(_model().parameters()), [])
