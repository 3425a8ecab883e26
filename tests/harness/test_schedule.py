"""The lr schedule is a pure function of the settings: checkpoints hold none of it, a resume
says what it does to the lr, and a warmup-stable-decay run extends without a jump."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sophia_pytorch.harness.checkpoint import CHECKSUM, save_checkpoint
from sophia_pytorch.harness.cli import main
from sophia_pytorch.harness.config import make_config
from sophia_pytorch.harness.errors import SophiaError
from sophia_pytorch.harness.schedule import LRSchedule, warmup_stable_decay
from sophia_pytorch.harness.trainer import train
from tests.harness.helpers import corpus_slice, tiny_config

DATA = Path(__file__).parent / "data"


def _steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "step"]


def _crash_at(step: int):
    def on_step(record):
        if record["step"] == step:
            raise KeyboardInterrupt

    return on_step


# ------------------------------------------------------------------ the schedules
def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_the_floor():
    # 10 steps, decay_fraction 0.3: the last 3 steps (7, 8, 9) decay; min_lr at step 10.
    at = [warmup_stable_decay(s, lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=10,
                              decay_fraction=0.3) for s in range(12)]
    assert at == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.4, 0.1, 0.1])


def test_a_longer_wsd_schedule_equals_the_shorter_one_until_the_shorter_ones_decay():
    short = LRSchedule("wsd", 0.1, warmup_steps=5, max_steps=100, decay_fraction=0.2)
    long = LRSchedule("wsd", 0.1, warmup_steps=5, max_steps=400, decay_fraction=0.2)
    assert short.decay_start() == 80
    assert [short.lr(s, 3e-3) for s in range(81)] == [long.lr(s, 3e-3) for s in range(81)]
    cosine = LRSchedule("cosine", 0.1, warmup_steps=5, max_steps=100, decay_fraction=0.2)
    stretched = LRSchedule("cosine", 0.1, warmup_steps=5, max_steps=400, decay_fraction=0.2)
    assert cosine.lr(50, 3e-3) < stretched.lr(50, 3e-3)  # why cosine cannot extend honestly


def test_a_checkpoint_holds_no_scheduler_state(tmp_path):
    result = train(tiny_config(tmp_path, max_steps=3))
    saved = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)
    assert "scheduler" not in saved and saved["format"] == 3
    assert all("initial_lr" not in group for group in saved["optimizer"]["param_groups"])


# ------------------------------------------------- old checkpoints (format 2, scheduler)
def _old_checkpoint_in(folder: Path, optimizer: str) -> Path:
    """The format-2 checkpoint (scheduler state, ``initial_lr`` in the groups) that the
    code before the stateless schedule wrote at step 3 of a 6-step run, moved to this
    machine's corpus slice."""
    state = torch.load(DATA / f"format2-{optimizer}-step3.checkpoint", weights_only=True)
    assert "scheduler" in state and state["format"] == 2
    state.pop(CHECKSUM)
    state["config"]["data"]["source"] = str(corpus_slice(folder / "data"))
    state["config"]["run"].update(out_dir=str(folder / "run"), cache_dir=str(folder / "cache"))
    (folder / "run").mkdir(parents=True)
    save_checkpoint(state, folder / "run" / "checkpoint.pt")
    return folder / "run"


def _same_rows(mine: dict, theirs: dict) -> bool:
    """Equal step rows, floats to 1e-5 relative ("seconds" aside): the fixture's first three
    steps ran on another machine, whose CPU kernels may round the last bit differently."""
    if mine.keys() != theirs.keys():
        return False
    for key in mine.keys() - {"seconds"}:
        a, b = mine[key], theirs[key]
        if isinstance(a, float) and isinstance(b, float):
            if a != pytest.approx(b, rel=1e-5):
                return False
        elif a != b:
            return False
    return True


@pytest.mark.parametrize("optimizer", ["sophiag", "muon"])
def test_an_old_checkpoint_with_scheduler_state_resumes_the_same_trajectory(tmp_path, optimizer):
    """Same lr at every step, same losses: the old scheduler state is neither needed nor
    misread. Bit for bit on the machine that wrote the fixture; here to float rounding."""
    settings = dict(optimizer=optimizer, n_embd=8, n_head=1, block_size=8, max_steps=6,
                    checkpoint_every=3, warmup_steps=2, eval_every=3)
    whole = train(tiny_config(tmp_path / "whole", **settings))
    run = _old_checkpoint_in(tmp_path / "old", optimizer)
    resumed = train(tiny_config(tmp_path / "old", **settings), resume=run)
    expected, got = _steps(whole.run_dir)[3:], _steps(resumed.run_dir)
    assert len(got) == len(expected) == 3
    assert [r["lr"] for r in got] == [r["lr"] for r in expected]  # the schedule: exact
    assert all(_same_rows(a, b) for a, b in zip(got, expected, strict=True)), (got, expected)
    assert resumed.evals[-1]["val_loss"] == pytest.approx(whole.evals[-1]["val_loss"], rel=1e-5)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)  # written by this code
    assert "scheduler" not in saved
    assert "initial_lr" not in str(saved["optimizer"])  # no scheduler key left in a group


# --------------------------------------------------------------------- resume rules
def test_resume_with_max_steps_below_the_checkpoints_step_is_refused(tmp_path, capsys):
    config = tiny_config(tmp_path, max_steps=4)
    train(config)
    before = (config.run.out_dir, (tmp_path / "run" / "config.json").read_text())
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--max-steps", "2",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "at step 4" in err and "--max-steps above 4" in err and err.count("\n") == 1
    assert (tmp_path / "run" / "config.json").read_text() == before[1]


def test_resuming_a_cosine_with_more_steps_says_the_lr_jumps(tmp_path, capsys):
    config = tiny_config(tmp_path, max_steps=4, warmup_steps=1)
    train(config)
    capsys.readouterr()
    longer = tiny_config(tmp_path, max_steps=8, warmup_steps=1)
    train(longer, resume=tmp_path / "run")
    err = capsys.readouterr().err
    lr, min_lr = longer.optimizer.lr, longer.optimizer.min_lr
    old = min_lr  # a 4-step cosine is at its floor at step 4
    new = LRSchedule("cosine", min_lr / lr, 1, 8, 0.2).lr(4, lr)
    assert f"the lr there is {new:.3g}, where the checkpoint's settings had {old:.3g}" in err
    assert "max_steps 4 -> 8" in err and "re-stretched" in err and "--schedule wsd" in err
    assert _steps(tmp_path / "run")[4]["lr"] == pytest.approx(new)


def test_a_wsd_run_resumed_from_its_stable_checkpoint_with_more_steps_is_the_longer_run(
        tmp_path, capsys):
    settings = dict(schedule="wsd", decay_fraction=0.25, warmup_steps=1, eval_every=4)
    longer = train(tiny_config(tmp_path / "long", max_steps=12, **settings))
    short = tiny_config(tmp_path / "short", max_steps=8, **settings)
    train(short)  # decays over steps 6-7, and saves stable.pt after step 6 (its last stable)
    stable = tmp_path / "short" / "run" / "stable.pt"
    assert torch.load(stable, weights_only=True)["train_state"]["step"] == 6
    capsys.readouterr()
    extended = train(tiny_config(tmp_path / "short", max_steps=12, **settings), resume=stable)
    assert "(no jump here)" in capsys.readouterr().err
    assert [r["loss"] for r in _steps(extended.run_dir)] == \
        [r["loss"] for r in _steps(longer.run_dir)]
    assert [r["lr"] for r in _steps(extended.run_dir)][5:8] == [longer.config["optimizer"]
                                                                ["lr"]] * 3  # no jump at 7


def test_an_edited_config_json_is_refused_on_resume_and_named(tmp_path, capsys):
    train(tiny_config(tmp_path, max_steps=2))
    path = tmp_path / "run" / "config.json"
    edited = json.loads(path.read_text())
    edited["optimizer"]["lr"] = 0.05
    path.write_text(json.dumps(edited))
    capsys.readouterr()
    args = ["train", "--resume", str(tmp_path / "run"), "--max-steps", "3", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "says lr=0.05" in err and "add --lr 0.05" in err and err.count("\n") == 1
    assert json.loads(path.read_text())["optimizer"]["lr"] == 0.05  # not overwritten
    assert main([*args, "--lr", "0.05"]) == 0  # given as a flag, it applies
    assert json.loads(path.read_text())["optimizer"]["lr"] == 0.05


def test_a_schedule_name_is_checked_against_its_choices():
    with pytest.raises(SophiaError, match="unknown schedule 'wds'.*did you mean 'wsd'"):
        make_config("tiny", {"schedule": "wds"})


def test_overwrite_removes_a_wsd_runs_stable_checkpoint(tmp_path):
    train(tiny_config(tmp_path, max_steps=4, schedule="wsd", decay_fraction=0.5))
    assert (tmp_path / "run" / "stable.pt").exists()
    train(tiny_config(tmp_path, max_steps=4), overwrite=True)
    assert not (tmp_path / "run" / "stable.pt").exists()
