"""The training loop: learning, schedule, Hessian refreshes, resume, non-finite steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sophia_pytorch.harness import trainer as train_module
from sophia_pytorch.harness.baselines.lion import Lion
from sophia_pytorch.harness.errors import SophiaError
from sophia_pytorch.harness.schedule import LRSchedule, warmup_cosine
from sophia_pytorch.harness.trainer import train
from tests.harness.helpers import tiny_config


def _log(run_dir, kind="step"):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    lr, floor = 1.0, 0.1
    at = [warmup_cosine(s, lr=lr, min_lr=floor, warmup_steps=4, max_steps=14) for s in range(16)]
    assert at[:4] == [0.25, 0.5, 0.75, 1.0]
    assert at[4] == 1.0 and at[14] == at[15] == floor
    assert at[9] == pytest.approx(floor + (lr - floor) * 0.5)  # half way: cos(pi/2) = 0
    assert all(a >= b for a, b in zip(at[4:], at[5:], strict=False))


def test_the_schedule_sets_each_groups_lr_from_its_own_base_lr():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 2.0},
                                 {"params": params[1:], "lr": 4.0}])
    schedule = LRSchedule("cosine", min_lr_ratio=0.1, warmup_steps=2, max_steps=4,
                          decay_fraction=0.2)
    seen = []
    for step in range(5):
        schedule.apply(optimizer, step, [2.0, 4.0])
        seen += [group["lr"] for group in optimizer.param_groups]
    assert seen == pytest.approx([1.0, 2.0, 2.0, 4.0, 2.0, 4.0, 1.1, 2.2, 0.2, 0.4])


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiah", "adamw", "lion", "muon"])
def test_every_optimizer_lowers_the_validation_loss(tmp_path, optimizer):
    # Lion's sign steps want a smaller lr; Muon's lr scales its AdamW part's 3e-3 (x lr/0.02).
    lr = {"lion": 3e-3, "muon": 0.05}.get(optimizer, 1e-2)
    config = tiny_config(tmp_path, optimizer=optimizer, lr=lr, min_lr=lr / 10, max_steps=12,
                         eval_every=12)
    result = train(config)
    assert result.steps == 12 and result.skipped_steps == 0
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"] - 0.3
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_sophiag_refreshes_the_refresh_every_k_steps(tmp_path):
    result = train(tiny_config(tmp_path, optimizer="sophiag", refresh_every=2, max_steps=6))
    steps = _log(result.run_dir)
    assert [r["step"] for r in steps if r["hessian"]] == [2, 4, 6]
    assert all(0.0 <= r["unclipped_fraction"] <= 1.0 for r in steps)
    assert result.hessian_seconds > 0


def test_a_refresh_owed_before_the_first_step_runs_before_it(tmp_path):
    import inspect

    import sophia_pytorch

    if "refresh_at_start" not in inspect.signature(sophia_pytorch.SophiaG).parameters:
        pytest.skip("this SophiaG has no refresh_at_start")
    config = tiny_config(tmp_path, optimizer="sophiag", refresh_every=2, max_steps=4,
                         sophia_options={"refresh_at_start": True})
    result = train(config)
    assert [r["hessian"] for r in _log(result.run_dir)] == [True, True, False, True]
    state = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["optimizer"]
    assert {int(s["hessian_step"]) for s in state["state"].values()} == {3}


def test_bfloat16_autocast_trains(tmp_path):
    result = train(tiny_config(tmp_path, dtype="bfloat16", max_steps=4))
    assert math.isfinite(result.final_val_loss)


def _crash_at(step):
    def on_step(record):
        if record["step"] == step:
            raise KeyboardInterrupt

    return on_step


@pytest.mark.parametrize("optimizer", ["sophiag", "adamw", "muon", "muon-sophiag"])
def test_resume_after_a_crash_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, optimizer):
    settings = dict(optimizer=optimizer, max_steps=8, checkpoint_every=3, grad_accum=2,
                    refresh_every=2, refresh_fraction=0.5, dropout=0.1)
    whole = train(tiny_config(tmp_path / "whole", **settings))
    crashed = tiny_config(tmp_path / "crash", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, on_step=_crash_at(5))  # dies after step 5; last checkpoint: step 3
    resumed = train(crashed, resume=crashed.run.out_dir)
    assert [r["loss"] for r in _log(resumed.run_dir)] == [r["loss"] for r in _log(whole.run_dir)]
    assert resumed.evals == [
        {**e, "seconds": r["seconds"]} for e, r in zip(whole.evals, resumed.evals, strict=True)
    ]
    final_whole = torch.load(whole.run_dir / "checkpoint.pt", weights_only=True)
    final_resumed = torch.load(resumed.run_dir / "checkpoint.pt", weights_only=True)
    for name, tensor in final_whole["model"].items():
        assert torch.equal(tensor, final_resumed["model"][name]), name


def _nan_loss_at(calls_to_poison):
    real = train_module.lm_loss
    count = {"n": 0}

    def poisoned(logits, targets):
        count["n"] += 1
        loss = real(logits, targets)
        return loss * math.nan if count["n"] in calls_to_poison else loss

    return poisoned


def test_a_non_finite_step_is_skipped_without_touching_the_optimizer(tmp_path, monkeypatch):
    # With evaluation off and one micro-batch, lm_loss call n is step n's forward.
    monkeypatch.setattr(train_module, "lm_loss", _nan_loss_at({3}))
    stepped = []
    real_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        stepped.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    result = train(tiny_config(tmp_path, optimizer="adamw", eval_every=0, max_steps=5))
    assert result.skipped_steps == 1
    assert [r["skipped"] for r in _log(result.run_dir)] == [False, False, True, False, False]
    assert len(stepped) == 4  # the optimizer never saw the bad step
    state = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["optimizer"]
    assert all(int(s["step"]) == 4 for s in state["state"].values())
    assert all(torch.isfinite(s["exp_avg"]).all() for s in state["state"].values())


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped_too(tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def infinite_on_second_call(parameters, max_norm, *args, **kwargs):
        calls["n"] += 1
        parameters = list(parameters)
        if calls["n"] == 2:
            parameters[0].grad.fill_(math.inf)
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", infinite_on_second_call)
    result = train(tiny_config(tmp_path, optimizer="sophiag", eval_every=0, max_steps=3))
    assert [r["skipped"] for r in _log(result.run_dir)] == [False, True, False]
    state = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["optimizer"]
    assert all(torch.isfinite(s["exp_avg"]).all() for s in state["state"].values())
    assert all(int(s["step"]) == 2 for s in state["state"].values())


def test_too_many_non_finite_steps_in_a_row_abort_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "lm_loss", lambda logits, targets: logits.sum() * math.nan)
    config = tiny_config(tmp_path, eval_every=0, max_bad_steps=3, max_steps=10)
    with pytest.raises(SophiaError, match="3 steps in a row.*non-finite.*lower --lr"):
        train(config)


def test_lion_matches_the_lion_pytorch_package():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    torch.manual_seed(0)
    ours_param = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    theirs_param = torch.nn.Parameter(ours_param.detach().clone())
    ours = Lion([ours_param], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    theirs = lion_pytorch.Lion([theirs_param], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(5, 3, dtype=torch.float64)
        ours_param.grad, theirs_param.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(ours_param, theirs_param)


def test_train_state_round_trips_through_its_state_dict():
    from sophia_pytorch.harness.trainer import TrainState

    state = TrainState(step=7, tokens=448, data_position=14, train_seconds=1.5,
                       hessian_seconds=0.25, skipped_steps=1, bad_in_row=0,
                       evals=[{"step": 5, "val_loss": 2.0, "seconds": 1.0, "tokens": 320}])
    saved = state.state_dict()
    again = TrainState()
    again.load_state_dict(saved)
    assert again == state
    saved["evals"][0]["val_loss"] = 9.0  # the loaded state holds its own rows
    assert again.evals[0]["val_loss"] == 2.0
