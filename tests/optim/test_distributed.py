"""SophiaG and SophiaH under DistributedDataParallel and FSDP2, against one process.

Two gloo processes each take half of a global batch; the reference is one process on the whole
batch, drawing the same sampled labels (each half from its own seeded generator) and the same
Hutchinson probes. Everything is float64, so "the same" means to float rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from sophia_pytorch import SophiaG, SophiaH, sampled_cross_entropy
from sophia_pytorch.functional import fused_kernel_available
from tests._multiprocess import run_on_ranks

WORLD_SIZE = 2
GLOBAL_BATCH = 8
STEPS = 6
REFRESH_EVERY = 2  # Hessian refreshes after steps 2, 4 and 6
RHO = 5.0  # large enough that a third of the coordinates escape the clip
TOLERANCE = dict(rtol=1e-9, atol=1e-12)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)
    ).double()


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, GLOBAL_BATCH, 6, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 5, (STEPS, GLOBAL_BATCH), generator=generator)
    return inputs, targets


def _label_generator(step: int, shard: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * step + shard)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else tensor).detach().clone()


def _snapshot(model: torch.nn.Module, optimizer: SophiaG, losses: list[float]) -> dict:
    named = list(model.named_parameters())
    return {
        "params": {name: _full(p) for name, p in named},
        "exp_avg": {name: _full(optimizer.state[p]["exp_avg"]) for name, p in named},
        "hessian": {name: _full(optimizer.state[p]["hessian"]) for name, p in named},
        "unclipped_fraction": optimizer.unclipped_fraction(),
        "losses": losses,
    }


def _train_sophiag(model, forward, optimizer, shards, num_samples_of) -> list[float]:
    """The plain SophiaG loop of the README over ``STEPS`` batches; ``shards``: my halves."""
    inputs, targets = _batches()
    losses = []
    for step in range(STEPS):
        x, y = inputs[step], targets[step]
        loss = sum(F.cross_entropy(forward(x[s]), y[s]) for s in shards) / len(shards)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if optimizer.hessian_due():
            draws = [
                sampled_cross_entropy(forward(x[s]), generator=_label_generator(step, i))
                for i, s in shards.items()
            ]
            (sum(loss for loss, _ in draws) / len(draws)).backward()
            optimizer.update_hessian(scale=num_samples_of(sum(n for _, n in draws)))
            optimizer.zero_grad(set_to_none=True)
    return losses


def _halves() -> dict[int, slice]:
    half = GLOBAL_BATCH // WORLD_SIZE
    return {r: slice(r * half, (r + 1) * half) for r in range(WORLD_SIZE)}


def _global_count(local: int) -> int:
    total = torch.tensor(local)
    dist.all_reduce(total)
    return int(total)


def _sophiag(model: torch.nn.Module, foreach: bool | None) -> SophiaG:
    return SophiaG(
        model.parameters(), lr=0.05, rho=RHO, refresh_every=REFRESH_EVERY, foreach=foreach
    )


def _sophiag_single_process(foreach: bool) -> dict:
    model = _model()
    optimizer = _sophiag(model, foreach)
    losses = _train_sophiag(model, model, optimizer, _halves(), num_samples_of=int)
    return _snapshot(model, optimizer, losses)


def _sophiag_ddp(rank: int, world_size: int, foreach: bool) -> dict:
    model = DistributedDataParallel(_model())
    optimizer = _sophiag(model, foreach)
    mine = {rank: _halves()[rank]}
    losses = _train_sophiag(model, model, optimizer, mine, num_samples_of=_global_count)
    snapshot = _snapshot(model.module, optimizer, losses)
    snapshot["losses"] = [_mean_over_ranks(loss) for loss in losses]
    return snapshot


def _sophiag_fsdp2(rank: int, world_size: int, foreach: bool | None) -> dict:
    model = _model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    optimizer = _sophiag(model, foreach)
    mine = {rank: _halves()[rank]}
    losses = _train_sophiag(model, model, optimizer, mine, num_samples_of=_global_count)
    snapshot = _snapshot(model, optimizer, losses)
    snapshot["losses"] = [_mean_over_ranks(loss) for loss in losses]
    snapshot["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    return snapshot


def _mean_over_ranks(value: float) -> float:
    total = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def _assert_same_run(run: dict, reference: dict) -> None:
    for key in ("params", "exp_avg", "hessian"):
        for name, expected in reference[key].items():
            torch.testing.assert_close(run[key][name], expected, **TOLERANCE, msg=f"{key} {name}")
    torch.testing.assert_close(run["losses"], reference["losses"], **TOLERANCE)


@pytest.fixture(scope="module")
def reference() -> dict:
    return _sophiag_single_process(foreach=False)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_sophiag_ddp, tmp_path_factory.mktemp("ddp"), False)


@pytest.fixture(
    scope="module", params=[False, True, None], ids=["for-loop", "foreach", "default"]
)
def fsdp2_runs(request, tmp_path_factory) -> list[dict]:
    """foreach=None takes the fused kernel on CPU where it builds; built here, before forking."""
    if request.param is None:
        fused_kernel_available()
    return run_on_ranks(_sophiag_fsdp2, tmp_path_factory.mktemp("fsdp2"), request.param)


def test_reference_run_refreshes_the_hessian(reference):
    assert all(h.abs().sum() > 0 for h in reference["hessian"].values())


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_sophiag_on_ddp_matches_one_process_on_the_global_batch(ddp_runs, reference, rank):
    _assert_same_run(ddp_runs[rank], reference)


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_sophiag_on_fsdp2_matches_one_process_on_the_global_batch(fsdp2_runs, reference, rank):
    _assert_same_run(fsdp2_runs[rank], reference)


def test_fsdp2_shards_the_parameters(fsdp2_runs, reference):
    total = sum(p.numel() for p in reference["params"].values())
    assert sum(run["local_numel"] for run in fsdp2_runs) == total
    assert all(run["local_numel"] < total for run in fsdp2_runs)


def test_unclipped_fraction_on_fsdp2_counts_whole_parameters(fsdp2_runs, reference):
    assert 0.0 < reference["unclipped_fraction"] < 1.0
    for run in fsdp2_runs:
        assert run["unclipped_fraction"] == pytest.approx(reference["unclipped_fraction"])


# --------------------------------------------------------------------------- SophiaH
def _hutchinson_loss(model: torch.nn.Module, shards: list[slice]) -> torch.Tensor:
    inputs, targets = _batches()
    return sum(F.cross_entropy(model(inputs[0][s]), targets[0][s]) for s in shards) / len(shards)


def _sophiah_hessians(rank: int | None, world_size: int) -> dict:
    """h after one refresh with probes seeded 7: on one process if ``rank`` is None, else DDP."""
    model = _model()
    shards = list(_halves().values()) if rank is None else [_halves()[rank]]
    forward = model if rank is None else DistributedDataParallel(model)
    optimizer = SophiaH(forward.parameters(), betas=(0.9, 0.5))
    optimizer.update_hessian(
        lambda: _hutchinson_loss(forward, shards), generator=torch.Generator().manual_seed(7)
    )
    return {name: optimizer.state[p]["hessian"].clone() for name, p in model.named_parameters()}


def test_sophiah_on_ddp_averages_the_estimate_to_the_single_process_one(tmp_path):
    reference = _sophiah_hessians(None, 1)
    assert all(h.abs().sum() > 0 for h in reference.values())
    for hessians in run_on_ranks(_sophiah_hessians, tmp_path):
        for name, expected in reference.items():
            torch.testing.assert_close(hessians[name], expected, **TOLERANCE, msg=name)


def _sophiah_on_fsdp2(rank: int, world_size: int) -> str:
    model = _model()
    fully_shard(model)
    optimizer = SophiaH(model.parameters())
    with pytest.raises(NotImplementedError, match="FSDP2") as error:
        optimizer.update_hessian(lambda: _hutchinson_loss(model, [_halves()[rank]]))
    return str(error.value)


def test_sophiah_on_fsdp2_refuses_with_a_clear_error(tmp_path):
    for message in run_on_ranks(_sophiah_on_fsdp2, tmp_path):
        assert "DistributedDataParallel" in message


# ------------------------------------------------------------------ all_reduce_mean
def _averaged(rank: int, world_size: int) -> list[torch.Tensor]:
    from sophia_pytorch import _dtensor as distributed

    distributed._BUCKET_BYTES = 64  # several buckets, split by size and by dtype
    tensors = [
        torch.full((3, 2), float(rank + 1), dtype=torch.float64),
        torch.full((5,), 10.0 * (rank + 1), dtype=torch.float32),
        torch.full((4,), -2.0 * (rank + 1), dtype=torch.float32),
        torch.arange(20, dtype=torch.float32) * (rank + 1),
    ]
    distributed.all_reduce_mean(tensors)
    model = _model()
    fully_shard(model)
    with pytest.raises(TypeError, match="DTensor"):
        distributed.all_reduce_mean(list(model.parameters()))
    return tensors


def test_all_reduce_mean_averages_every_tensor_in_place_across_buckets(tmp_path):
    expected = [  # the mean of rank + 1 over ranks 0 and 1 is 1.5
        torch.full((3, 2), 1.5, dtype=torch.float64),
        torch.full((5,), 15.0),
        torch.full((4,), -3.0),
        torch.arange(20, dtype=torch.float32) * 1.5,
    ]
    for tensors in run_on_ranks(_averaged, tmp_path):
        for tensor, reference in zip(tensors, expected, strict=True):
            assert tensor.dtype == reference.dtype
            torch.testing.assert_close(tensor, reference, rtol=0, atol=0)
