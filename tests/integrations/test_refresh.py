"""``sophia_pytorch.refresh`` as the trainers call it (scaler, autocast), against references
computed another way (float64, the same drawn labels, plain all-reduces of per-rank sums)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sophia_pytorch import SophiaG, SophiaH, sampled_cross_entropy
from sophia_pytorch.refresh import find_sophia, gauss_newton_bartlett, hutchinson
from tests._multiprocess import run_on_ranks
from tests.integrations.helpers import hessians_of

CLASSES = 5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, CLASSES)).double()


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 6, 4) inputs and a (2, 6) mask keeping 3 positions on rank 0 and 11 on rank 1."""
    generator = torch.Generator().manual_seed(10 + rank)
    inputs = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[: 3 if rank == 0 else 11] = True
    return inputs, mask.reshape(2, 6)


def _labels(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(100 + rank)


def _refresh_on_rank(rank: int, world_size: int) -> dict:
    model = _model()
    optimizer = SophiaG(model.parameters(), betas=(0.9, 0.0))  # β2 = 0: h is the estimate
    inputs, mask = _batch(rank)
    folded = gauss_newton_bartlett(optimizer, [lambda: (model(inputs), mask)],
                                   generator=_labels(rank))
    grads_after = [p.grad for p in model.parameters()]
    # Reference: the gradient of Σ (kept CE over both ranks) / B_total, by summing each rank's
    # sum-gradient with a plain all-reduce; same labels (same generator seed).
    loss, count = sampled_cross_entropy(model(inputs), mask=mask, generator=_labels(rank))
    (loss * count).backward()
    sums = [p.grad.clone() for p in model.parameters()]
    total = torch.tensor(count)
    for tensor in [*sums, total]:
        dist.all_reduce(tensor)
    reference = [int(total) * (g / int(total)) ** 2 for g in sums]
    # What averaging the two per-rank means would give instead (wrong with unequal counts).
    model.zero_grad()
    sampled_cross_entropy(model(inputs), mask=mask, generator=_labels(rank))[0].backward()
    means = [p.grad.clone() for p in model.parameters()]
    for tensor in means:
        dist.all_reduce(tensor)
    naive = [int(total) * (g / world_size) ** 2 for g in means]
    return {"folded": folded, "hessians": hessians_of(optimizer), "reference": reference,
            "naive": naive, "grads_after": grads_after}


def test_refresh_on_two_ranks_with_unequal_counts_is_the_global_batch_mean():
    """Rank 0 keeps 3 positions, rank 1 keeps 11: h is B·ĝ⊙ĝ with ĝ the gradient of the mean
    over all 14, on both ranks, and not what averaging the ranks' means would give."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        runs = run_on_ranks(_refresh_on_rank, Path(folder))
    for run in runs:
        assert run["folded"] and all(g is None for g in run["grads_after"])
        for h, reference, naive in zip(run["hessians"], run["reference"], run["naive"],
                                       strict=True):
            torch.testing.assert_close(h, reference, rtol=1e-10, atol=1e-14)
            assert not torch.allclose(h, naive, rtol=1e-3)
    for h0, h1 in zip(runs[0]["hessians"], runs[1]["hessians"], strict=True):
        assert torch.equal(h0, h1)


def _refreshed(scaler=None, dtype=torch.float32):
    model = _model().to(dtype)
    optimizer = SophiaG(model.parameters(), betas=(0.9, 0.0))
    inputs, mask = _batch(1)
    folded = gauss_newton_bartlett(optimizer, [lambda: (model(inputs.to(dtype)), mask)],
                                  generator=_labels(1), scaler=scaler)
    return folded, hessians_of(optimizer)


def test_a_gradscaler_is_undone_and_left_as_it_was():
    """Scale 2^16 (a power of two, so exact in float32): the same h as without a scaler; the
    scaler's scale and growth tracker are untouched."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))  # make its scale tensor, as a training step would
    tracker = scaler._growth_tracker.clone()
    folded, scaled = _refreshed(scaler)
    _, plain = _refreshed()
    assert folded
    for h, reference in zip(scaled, plain, strict=True):
        torch.testing.assert_close(h, reference, rtol=1e-6, atol=0)
    assert scaler.get_scale() == 2.0**16 and torch.equal(scaler._growth_tracker, tracker)


def test_an_overflowing_refresh_is_skipped_and_the_scaler_left_alone():
    """A float16 model with a scale of 2^24: its gradients overflow. The refresh reports
    False, h stays zero, and the scaler's scale is not lowered (that is its own step's
    business); the same model at 2^4 folds a finite estimate in."""
    for scale, overflows in ((2.0**24, True), (2.0**4, False)):
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        scaler.scale(torch.ones(()))
        folded, hessians = _refreshed(scaler, dtype=torch.float16)
        assert folded is not overflows
        assert all(torch.isfinite(h).all() for h in hessians)
        assert all(torch.equal(h, torch.zeros_like(h)) for h in hessians) is overflows
        assert scaler.get_scale() == scale


def test_hutchinson_refresh_with_a_gradscaler_matches_one_without():
    model = _model()
    inputs, _ = _batch(0)

    def loss():
        return model(inputs).pow(2).mean()

    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        optimizer = SophiaH(model.parameters(), betas=(0.9, 0.0))
        if scaler is not None:
            scaler.scale(torch.ones(()))
        assert hutchinson(optimizer, loss, generator=torch.Generator().manual_seed(5),
                                  scaler=scaler)
        results.append(hessians_of(optimizer))
    for h, reference in zip(*results, strict=True):
        torch.testing.assert_close(h, reference, rtol=1e-12, atol=0)
        assert h.abs().sum() > 0


def test_find_sophia_unwraps_optimizer_attributes_and_names_what_it_found():
    optimizer = SophiaG(_model().parameters())

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    assert find_sophia(Wrapper(Wrapper(optimizer))) is optimizer
    adamw = torch.optim.AdamW(_model().parameters())
    try:
        find_sophia(Wrapper(adamw))
    except TypeError as error:
        assert "got AdamW" in str(error)
    else:
        raise AssertionError("find_sophia accepted AdamW")
