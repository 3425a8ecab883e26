"""`sophia train --parallel ddp|fsdp`: two ranks, a crash, a resume that continues the curve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from sophia_pytorch.harness import distributed as parallel
from sophia_pytorch.harness.trainer import train
from tests._multiprocess import free_port, run_on_ranks
from tests.harness.helpers import corpus_slice, tiny_config

WORLD_SIZE = 2


def _steps(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "step"]


def _torchrun_env() -> dict[str, str]:
    return {"RANK": "{rank}", "LOCAL_RANK": "{rank}", "WORLD_SIZE": str(WORLD_SIZE),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def _train(rank: int, world_size: int, folder, settings: dict, crash_at: int | None,
           resume: str | None) -> str:
    """One rank of `sophia train` under torchrun: train, maybe crash after step ``crash_at``."""

    def on_step(record: dict) -> None:
        if record["step"] == crash_at:
            raise KeyboardInterrupt

    try:
        train(tiny_config(folder, **settings), resume=resume, on_step=on_step)
        return "finished"
    except KeyboardInterrupt:
        return "crashed"
    finally:
        parallel.destroy()


def _run(tmp_path, name: str, settings: dict, crash_at=None, resume=None) -> list[str]:
    settings = {**settings, "out_dir": str(tmp_path / name)}
    return run_on_ranks(_train, tmp_path / f"{name}-ranks", tmp_path, settings, crash_at,
                        resume, init=False, env=_torchrun_env())


SETTINGS = dict(optimizer="sophiag", max_steps=6, checkpoint_every=3, refresh_every=2,
                grad_accum=2, eval_every=3)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def crashed(request, tmp_path_factory):
    """Two-rank runs of 6 steps: "whole", and "cut", killed after step 4 (checkpoint at 3)."""
    mode, folder = request.param, tmp_path_factory.mktemp(request.param)
    settings = {**SETTINGS, "parallel": mode}
    corpus_slice(folder / "data")  # once, before the ranks read it
    assert _run(folder, "whole", settings) == ["finished"] * WORLD_SIZE
    assert _run(folder, "cut", settings, crash_at=4) == ["crashed"] * WORLD_SIZE
    return mode, folder, settings


def _resumed_copy(folder, name: str):
    """A copy of the crashed run, so that each test resumes its own."""
    shutil.copytree(folder / "cut", folder / name)
    return folder / name


def test_two_rank_run_killed_and_resumed_continues_its_loss_curve(crashed):
    mode, folder, settings = crashed
    resumed_dir = _resumed_copy(folder, "resumed")
    settings = {**settings, "out_dir": str(resumed_dir)}
    ranks = run_on_ranks(_train, folder / "resumed-ranks", folder, settings, None,
                         str(resumed_dir), init=False, env=_torchrun_env())
    assert ranks == ["finished"] * WORLD_SIZE

    whole, resumed = _steps(folder / "whole"), _steps(resumed_dir)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5, 6]
    assert [row["hessian"] for row in whole] == [False, True] * 3
    for ours, theirs in zip(resumed, whole, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert ours["unclipped_fraction"] == pytest.approx(theirs["unclipped_fraction"])
    assert whole[-1]["tokens"] == 6 * WORLD_SIZE * 2 * 4 * 16  # steps·ranks·accum·rows·block
    sharded = sorted(p.name for p in resumed_dir.glob("checkpoint-*"))
    assert sharded == (["checkpoint-00000006"] if mode == "fsdp" else [])


@pytest.mark.parametrize("crashed", ["fsdp"], indirect=True)
def test_fsdp2_run_of_two_ranks_resumes_in_one_process(crashed):
    """DCP reshards the checkpoint; 8 rows on one rank are the two ranks' 4 + 4 windows."""
    _, folder, settings = crashed
    resumed_dir = _resumed_copy(folder, "one-process")
    one_process = {**settings, "parallel": "none", "batch_size": 8, "out_dir": str(resumed_dir)}
    train(tiny_config(folder, **one_process), resume=resumed_dir)
    whole, resumed = _steps(folder / "whole"), _steps(resumed_dir)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5, 6]
    # Step 4 starts from the checkpoint; from its refresh on, one process draws other labels.
    assert resumed[3]["loss"] == pytest.approx(whole[3]["loss"], rel=1e-5)


def test_parallel_mode_without_torchrun_is_refused_in_one_line(tmp_path):
    from sophia_pytorch.harness.errors import SophiaError

    with pytest.raises(SophiaError, match="torchrun"):
        train(tiny_config(tmp_path, parallel="ddp"))


@pytest.mark.slow
def test_torchrun_launches_two_ranks_of_sophia_train(tmp_path):
    data = corpus_slice(tmp_path / "data")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "sophia_pytorch.harness", "train", "--parallel", "ddp", "--device", "cpu",
        "--n-layer", "1",
        "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1", "--no-progress",
        "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
        "--out-dir", str(tmp_path / "run"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 2 steps") == 1  # rank 0 reports, rank 1 stays quiet
    assert [row["step"] for row in _steps(tmp_path / "run")] == [1, 2]
