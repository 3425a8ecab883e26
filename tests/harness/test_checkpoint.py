"""Checkpoints: atomic writes, weights_only loading, RNG capture, user-facing errors."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sophia_pytorch.harness.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from sophia_pytorch.harness.errors import SophiaError


def _state(value: float, size: int = 1000) -> dict:
    return {"model": {"w": torch.full((size,), value)}, "step": int(value), "rng": rng_state()}


def test_round_trip_loads_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(3.0), path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.full((1000,), 3.0))
    assert torch.load(path, weights_only=True)["step"] == 3


def test_a_run_folder_resolves_to_its_checkpoint(tmp_path):
    save_checkpoint(_state(1.0), tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path)["step"] == 1


def test_failure_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(1.0), path)

    def dies_halfway(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # what a Ctrl-C or kill looks like mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


WRITER = """
import sys, torch
from sophia_pytorch.harness.checkpoint import save_checkpoint
path = sys.argv[1]
step = 0
while True:
    step += 1
    save_checkpoint({"model": {"w": torch.full((2_000_000,), float(step))}, "step": step}, path)
    print(step, flush=True)
"""


def test_kill_during_writes_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "1"  # one complete checkpoint exists
        time.sleep(0.3)  # now it is somewhere in a later write
    finally:
        writer.kill()
        writer.wait()
    state = load_checkpoint(path)
    assert state["step"] >= 1
    assert torch.equal(state["model"]["w"], torch.full((2_000_000,), float(state["step"])))


def test_damaged_checkpoint_is_a_one_line_user_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SophiaError, match="cannot read checkpoint") as raised:
        load_checkpoint(path)
    assert "\n" not in str(raised.value)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(SophiaError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_rng_state_restores_every_generator(tmp_path):
    save_checkpoint({"model": {}, "step": 0, "rng": rng_state()}, tmp_path / "c.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
