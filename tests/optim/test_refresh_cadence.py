"""When a Hessian refresh is due: ``refresh_every`` steps after the last one.

The reference is a plain-Python replay of the rule (a list of step counts), independent of the
optimizer's counters; each test drives a real SophiaG through ``hessian_due()`` and records the
step counts at which it refreshed.
"""

from __future__ import annotations

import pytest
import torch

import sophia_pytorch
from tests.optim.reference import torch_on_one_thread  # noqa: F401  (autouse fixture)


def _schedule(steps: int, k_at: dict[int, int], *, at_start: bool = False,
              last: int | None = None) -> list[int]:
    """Step counts (steps taken when refreshing) of a loop that refreshes whenever one is due:
    the first after k steps (or at 0 with ``at_start``), each next k steps after the last; k
    is ``k_at[t]`` from step count t on."""
    refreshed, k = [], None
    for taken in range(steps + 1):
        k = k_at.get(taken, k)
        due = (at_start or taken >= k) if last is None else taken >= last + k
        if due:
            refreshed.append(taken)
            last = taken
    return refreshed


def _run(optimizer: sophia_pytorch.SophiaG, param: torch.Tensor, steps: int,
         k_at: dict[int, int] | None = None) -> list[int]:
    """Take ``steps`` steps, asking ``hessian_due()`` before and after each (as a loop that
    refreshes before or after its step does) and refreshing when due; set ``refresh_every`` to
    ``k_at[t]`` once t steps are taken. Return the step counts at the refreshes."""
    refreshed = []
    start = optimizer.steps_taken()
    for _ in range(steps):
        for _ask in range(2):
            taken = optimizer.steps_taken()
            if k_at and taken in k_at:
                optimizer.param_groups[0]["refresh_every"] = k_at[taken]
            if optimizer.hessian_due():
                param.grad = torch.ones_like(param)
                assert optimizer.update_hessian(scale=1) is True
                refreshed.append(taken)
            if _ask == 0:
                param.grad = torch.ones_like(param)
                optimizer.step()
    assert optimizer.steps_taken() == start + steps
    return refreshed


@pytest.mark.parametrize("at_start", [False, True], ids=["default", "refresh_at_start"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_the_default_cadence_is_after_steps_k_2k_and_so_on(k, at_start):
    param = torch.zeros(3, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], refresh_every=k, refresh_at_start=at_start)
    refreshed = _run(optimizer, param, 35)
    assert refreshed == _schedule(35, {0: k}, at_start=at_start)
    assert refreshed == ([0] if at_start else []) + list(range(k, 36, k))


def test_raising_refresh_every_mid_run_counts_from_the_last_refresh():
    """k 10 -> 100 after the refresh at step 500: the next comes at 600, not at 5000."""
    param = torch.zeros(3, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], refresh_every=10)
    refreshed = _run(optimizer, param, 1500, k_at={501: 100})
    assert refreshed == _schedule(1500, {0: 10, 501: 100})
    assert refreshed[-11:] == [500, 600, 700, 800, 900, 1000, 1100, 1200, 1300, 1400, 1500]


def test_lowering_refresh_every_mid_run_counts_from_the_last_refresh():
    param = torch.zeros(3, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], refresh_every=10)
    refreshed = _run(optimizer, param, 40, k_at={15: 4})
    assert refreshed == _schedule(40, {0: 10, 15: 4}) == [10, 15, 19, 23, 27, 31, 35, 39]


def test_a_resumed_run_with_a_new_refresh_every_counts_from_the_saved_last_refresh():
    """The harness's case: a k = 2 run checkpointed after 11 steps resumes with k = 4."""
    param = torch.zeros(3, requires_grad=True)
    first = sophia_pytorch.SophiaG([param], refresh_every=2)
    before = _run(first, param, 11)
    saved = first.state_dict()
    resumed_param = param.detach().clone().requires_grad_()
    resumed = sophia_pytorch.SophiaG([resumed_param], refresh_every=4)
    resumed.load_state_dict(saved)
    resumed.param_groups[0]["refresh_every"] = 4  # load_state_dict restored the saved k = 2
    after = _run(resumed, resumed_param, 14)
    assert before + after == _schedule(25, {0: 2, 11: 4})
    assert after == [14, 18, 22]


@pytest.mark.parametrize("at_start", [False, True], ids=["default", "refresh_at_start"])
@pytest.mark.parametrize("how", ["load_state_dict", "pickle"])
def test_a_checkpoint_saved_before_last_refresh_step_existed_keeps_its_cadence(at_start, how):
    param = torch.zeros(3, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], refresh_every=3, refresh_at_start=at_start)
    before = _run(optimizer, param, 7)
    for state in optimizer.state.values():
        del state["last_refresh_step"]  # what an older version saved
    if how == "load_state_dict":
        saved = optimizer.state_dict()
        optimizer = sophia_pytorch.SophiaG([param], refresh_every=3, refresh_at_start=at_start)
        optimizer.load_state_dict(saved)
    else:
        optimizer.__setstate__(optimizer.__getstate__())
    assert optimizer.last_refresh_step() == 6
    after = _run(optimizer, param, 13)
    assert before + after == _schedule(20, {0: 3}, at_start=at_start)


def test_the_cadence_reads_no_tensor_on_the_parameters_device():
    """The counters live on the CPU: on the meta device, where no value can be read, asking
    ``hessian_due()`` and refreshing still work (the sync-free guarantee on CUDA)."""
    param = torch.zeros(3, device="meta", requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], refresh_every=2, foreach=False)
    refreshed = _run(optimizer, param, 6)
    assert refreshed == [2, 4, 6]
    assert all(optimizer.state[param][k].device.type == "cpu"
               for k in ("step", "hessian_step", "last_refresh_step"))
