"""harness.distributed: torchrun environment, DDP/FSDP2 wrapping, accumulation, reductions, DCP.

Two gloo processes on CPU; references are computed in this process on the global batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from sophia_pytorch import SophiaG, sampled_cross_entropy
from sophia_pytorch.harness import distributed as parallel
from tests._multiprocess import free_port, run_on_ranks

WORLD_SIZE = 2
TOLERANCE = dict(rtol=1e-9, atol=1e-12)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)
    ).double()


def _batch(index: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(index)
    return (torch.randn(rows, 6, dtype=torch.float64, generator=generator),
            torch.randint(0, 5, (rows,), generator=generator))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: parallel.full_tensor(p.grad).clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------ environment
def test_init_from_env_without_torchrun_is_one_process_and_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = parallel.init_from_env("cpu")
    assert env == parallel.ParallelEnv(0, 1, 0, torch.device("cpu"), True)
    assert not parallel.is_initialized()
    assert parallel.global_num_samples(7) == 7
    assert parallel.mean_over_ranks(2.5) == 2.5


def _joined(rank: int, world_size: int) -> tuple:
    env = parallel.init_from_env("auto")
    joined = (env, torch.distributed.get_backend(), parallel.global_num_samples(rank + 1),
              parallel.mean_over_ranks(torch.tensor(float(rank))))
    parallel.barrier()
    parallel.destroy()
    return (*joined, parallel.is_initialized())


@pytest.fixture(scope="module")
def joined(tmp_path_factory) -> list[tuple]:
    env = {"RANK": "{rank}", "LOCAL_RANK": "{rank}", "WORLD_SIZE": str(WORLD_SIZE),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return run_on_ranks(_joined, tmp_path_factory.mktemp("env"), init=False, env=env)


def test_init_from_env_reads_torchrun_variables_and_joins_a_gloo_group_on_cpu(joined):
    for rank, (env, backend, *_) in enumerate(joined):
        assert env == parallel.ParallelEnv(rank, WORLD_SIZE, rank, torch.device("cpu"), rank == 0)
        assert backend == "gloo"


def test_global_num_samples_sums_over_ranks(joined):
    assert [result[2] for result in joined] == [3, 3]


def test_mean_over_ranks_averages_a_scalar(joined):
    assert [result[3] for result in joined] == [0.5, 0.5]


def test_destroy_leaves_the_group(joined):
    assert not any(result[4] for result in joined)


def test_wrap_model_refuses_an_unknown_mode_and_a_parallel_mode_without_a_group():
    with pytest.raises(ValueError, match="unknown parallel mode"):
        parallel.wrap_model(_model(), "zero3")
    with pytest.raises(RuntimeError, match="torchrun"):
        parallel.wrap_model(_model(), "ddp")
    model = _model()
    assert parallel.wrap_model(model, "none") is model


# ---------------------------------------------------------------- gradient accumulation
def _accumulate(rank: int, world_size: int, mode: str) -> dict:
    """Two micro-batches of four rows per rank; sync on the last only."""
    model = _model()
    train_model = parallel.wrap_model(model, mode)
    x, y = _batch(0, rows=16)
    mine = [slice(8 * rank, 8 * rank + 4), slice(8 * rank + 4, 8 * rank + 8)]
    after_first = None
    for index, rows in enumerate(mine):
        with parallel.gradient_sync(train_model, enabled=index == len(mine) - 1):
            (F.cross_entropy(train_model(x[rows]), y[rows]) / len(mine)).backward()
        if index == 0:
            after_first = {n: None if p.grad is None else parallel.full_tensor(p.grad).clone()
                           for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    return {"after_first": after_first, "grads": _grads(model),
            "norm": float(parallel.full_tensor(norm)), "wrapper": type(train_model).__name__,
            "dtensor": all(isinstance(p, DTensor) for p in model.parameters())}


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def accumulated(request, tmp_path_factory) -> tuple[str, list[dict]]:
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, run_on_ranks(_accumulate, folder, request.param)


def test_wrap_model_hands_the_model_to_ddp_or_fsdp2(accumulated):
    mode, runs = accumulated
    for run in runs:
        if mode == "ddp":
            assert run["wrapper"] == "DistributedDataParallel" and not run["dtensor"]
        else:
            assert run["wrapper"].startswith("FSDP") and run["dtensor"]


def test_accumulated_gradient_equals_the_full_batch_gradient(accumulated):
    _, runs = accumulated
    model = _model()
    x, y = _batch(0, rows=16)
    F.cross_entropy(model(x), y).backward()
    for run in runs:
        for name, expected in _grads(model).items():
            torch.testing.assert_close(run["grads"][name], expected, **TOLERANCE, msg=name)


def test_gradient_sync_disabled_leaves_the_micro_batch_unreduced(accumulated):
    mode, runs = accumulated
    if mode == "fsdp":  # FSDP2 keeps the unsynced gradient unsharded, off the parameters
        assert all(g is None for run in runs for g in run["after_first"].values())
        return
    model = _model()
    x, y = _batch(0, rows=16)
    for rank, run in enumerate(runs):
        model.zero_grad()
        (F.cross_entropy(model(x[8 * rank:8 * rank + 4]), y[8 * rank:8 * rank + 4]) / 2).backward()
        for name, expected in _grads(model).items():
            torch.testing.assert_close(run["after_first"][name], expected, **TOLERANCE)


def test_full_tensor_makes_the_gradient_norm_the_global_one(accumulated):
    _, runs = accumulated  # under FSDP2 clip_grad_norm_ returns a DTensor
    model = _model()
    x, y = _batch(0, rows=16)
    F.cross_entropy(model(x), y).backward()
    expected = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9))
    for run in runs:
        assert run["norm"] == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- checkpoints
def _sophiag_steps(train_model, optimizer, shards: dict[int, slice], steps: range) -> None:
    """SophiaG on my ``shards`` of batches 10+step; shard i draws labels from seed (step, i)."""
    for step in steps:
        x, y = _batch(10 + step)
        losses = [F.cross_entropy(train_model(x[rows]), y[rows]) for rows in shards.values()]
        (sum(losses) / len(losses)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if optimizer.hessian_due():
            draws = [
                sampled_cross_entropy(train_model(x[rows]),
                                      generator=torch.Generator().manual_seed(100 * step + i))
                for i, rows in shards.items()
            ]
            (sum(loss for loss, _ in draws) / len(draws)).backward()
            optimizer.update_hessian(scale=parallel.global_num_samples(sum(n for _, n in draws)))
            optimizer.zero_grad(set_to_none=True)


def _mine(rank: int) -> dict[int, slice]:
    return {rank: slice(4 * rank, 4 * rank + 4)}


BOTH_HALVES = {0: slice(0, 4), 1: slice(4, 8)}
SAVED_AFTER, RUN_UNTIL = 3, 6  # Hessian refreshes after steps 2, 4 and 6


def _state(model: torch.nn.Module, optimizer: SophiaG) -> dict:
    named = list(model.named_parameters())
    return {
        "params": {n: parallel.full_tensor(p).detach().clone() for n, p in named},
        **{key: {n: parallel.full_tensor(optimizer.state[p][key]).clone() for n, p in named}
           for key in ("exp_avg", "hessian", "step")},
    }


def _sophiag(model: torch.nn.Module) -> SophiaG:
    return SophiaG(model.parameters(), lr=0.05, rho=5.0, refresh_every=2)


def _uninterrupted_fsdp2(rank: int, world_size: int, folder: str) -> tuple[dict, dict]:
    """Steps 0-2, a sharded checkpoint, steps 3-5: the states at the checkpoint and the end."""
    model = _model()
    parallel.wrap_model(model, "fsdp")
    optimizer = _sophiag(model)
    _sophiag_steps(model, optimizer, _mine(rank), range(SAVED_AFTER))
    parallel.save_sharded(folder, model, optimizer)
    at_checkpoint = _state(model, optimizer)
    _sophiag_steps(model, optimizer, _mine(rank), range(SAVED_AFTER, RUN_UNTIL))
    return at_checkpoint, _state(model, optimizer)


def _resumed_fsdp2(rank: int, world_size: int, folder: str) -> tuple[dict, dict]:
    """A fresh job: load the checkpoint, take steps 3-5; the states loaded and at the end."""
    model = _model()
    parallel.wrap_model(model, "fsdp")
    optimizer = _sophiag(model)
    parallel.load_sharded(folder, model, optimizer)
    loaded = _state(model, optimizer)
    _sophiag_steps(model, optimizer, _mine(rank), range(SAVED_AFTER, RUN_UNTIL))
    return loaded, _state(model, optimizer)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[str, dict, dict]:
    folder = tmp_path_factory.mktemp("dcp")
    runs = run_on_ranks(_uninterrupted_fsdp2, folder / "ranks", str(folder / "checkpoint"))
    return str(folder / "checkpoint"), *runs[0]


def _assert_same_state(state: dict, expected: dict, **tolerance) -> None:
    for key, tensors in expected.items():
        for name, tensor in tensors.items():
            torch.testing.assert_close(state[key][name], tensor, **tolerance, msg=key + name)


def test_fsdp2_run_resumed_from_a_sharded_checkpoint_continues_as_if_never_stopped(
    uninterrupted, tmp_path
):
    folder, at_checkpoint, at_end = uninterrupted
    assert any(t.abs().sum() > 0 for t in at_checkpoint["hessian"].values())
    for loaded, resumed_end in run_on_ranks(_resumed_fsdp2, tmp_path, folder):
        _assert_same_state(loaded, at_checkpoint, rtol=0, atol=0)
        _assert_same_state(resumed_end, at_end, **TOLERANCE)


def test_fsdp2_checkpoint_of_two_ranks_resumes_in_one_process_without_fsdp(uninterrupted):
    folder, at_checkpoint, at_end = uninterrupted
    model = _model()
    optimizer = _sophiag(model)
    parallel.load_sharded(folder, model, optimizer)
    _assert_same_state(_state(model, optimizer), at_checkpoint, rtol=0, atol=0)
    _sophiag_steps(model, optimizer, BOTH_HALVES, range(SAVED_AFTER, RUN_UNTIL))
    _assert_same_state(_state(model, optimizer), at_end, **TOLERANCE)


def test_a_ddp_wrapped_model_saves_and_loads_through_dcp_too(tmp_path):
    results = run_on_ranks(_ddp_round_trip, tmp_path, str(tmp_path / "checkpoint"))
    for saved_state, loaded_state in results:
        _assert_same_state(loaded_state, saved_state, rtol=0, atol=0)


def _ddp_round_trip(rank: int, world_size: int, folder: str) -> tuple[dict, dict]:
    model = _model()
    train_model = parallel.wrap_model(model, "ddp")
    assert isinstance(train_model, DistributedDataParallel)
    optimizer = _sophiag(train_model)
    _sophiag_steps(train_model, optimizer, _mine(rank), range(SAVED_AFTER))
    parallel.save_sharded(folder, train_model, optimizer)
    fresh = _model()
    fresh_train = parallel.wrap_model(fresh, "ddp")
    fresh_optimizer = _sophiag(fresh_train)
    parallel.load_sharded(folder, fresh_train, fresh_optimizer)
    return _state(model, optimizer), _state(fresh, fresh_optimizer)
