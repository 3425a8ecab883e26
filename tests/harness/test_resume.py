"""A resume reads its checkpoint once, builds no second optimizer, and applies exactly the
hyperparameters whose settings changed (``sophia_pytorch.harness.resume``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sophia_pytorch
from sophia_pytorch.harness import checkpoint as checkpoint_module
from sophia_pytorch.harness import trainer as trainer_module
from sophia_pytorch.harness.cli import main
from sophia_pytorch.harness.compare import runner
from sophia_pytorch.harness.config import OptimizerConfig
from sophia_pytorch.harness.resume import apply_changed_settings, group_settings
from sophia_pytorch.harness.trainer import train
from tests.harness.helpers import tiny_config


def _spy_on_loads(monkeypatch) -> dict[str, list[Path]]:
    """Every path ``torch.load`` and the CRC-32 check are called on, from now."""
    calls: dict[str, list[Path]] = {"load": [], "verify": []}
    real_load, real_verify = torch.load, checkpoint_module.verify_records

    def load(path, *args, **kwargs):
        calls["load"].append(Path(path).resolve())
        return real_load(path, *args, **kwargs)

    def verify(path):
        calls["verify"].append(Path(path).resolve())
        return real_verify(path)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(checkpoint_module, "verify_records", verify)
    return calls


def test_sophia_train_resume_loads_and_verifies_the_checkpoint_once(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, max_steps=2)
    train(config)
    checkpoint = (Path(config.run.out_dir) / "checkpoint.pt").resolve()
    calls = _spy_on_loads(monkeypatch)
    assert main(["train", "--resume", config.run.out_dir, "--max-steps", "4",
                 "--lr", "0.002", "--no-progress"]) == 0
    assert calls["load"].count(checkpoint) == 1
    assert calls["verify"].count(checkpoint) == 1


def test_train_with_a_resume_folder_loads_the_checkpoint_once(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, max_steps=2)
    train(config)
    checkpoint = (Path(config.run.out_dir) / "checkpoint.pt").resolve()
    calls = _spy_on_loads(monkeypatch)
    train(tiny_config(tmp_path, max_steps=3), resume=config.run.out_dir)
    assert calls["load"] == [checkpoint]
    assert calls["verify"] == [checkpoint]


def test_a_resume_builds_one_optimizer_even_when_its_settings_change(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, max_steps=2))
    built = []
    real = trainer_module.build_optimizer
    monkeypatch.setattr(trainer_module, "build_optimizer",
                        lambda *args, **kwargs: built.append(1) or real(*args, **kwargs))
    train(tiny_config(tmp_path, max_steps=3, rho=0.5, weight_decay=0.3),
          resume=tmp_path / "run")
    assert len(built) == 1


def test_compare_reads_a_killed_runs_settings_from_its_config_json(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, max_steps=2)
    train(config)
    folder = Path(config.run.out_dir)
    calls = _spy_on_loads(monkeypatch)
    found = runner._checkpoint_config(folder)
    assert found == json.loads((folder / "config.json").read_text())
    assert calls["load"] == []
    (folder / "config.json").unlink()  # then the checkpoint says
    assert runner._checkpoint_config(folder) == found
    assert calls["load"] == [(folder / "checkpoint.pt").resolve()]


# ------------------------------------------------- which hyperparameters a resume applies
def _sophia_after_load(rho_now: float) -> tuple[torch.optim.Optimizer, list[dict]]:
    """A SophiaG built at rho 0.04, weight decay 0.1, whose loaded groups say ``rho_now``
    (a rho the optimizer adapted as it ran), and the groups as built."""
    param = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = sophia_pytorch.SophiaG([param], lr=1e-3, rho=0.04, weight_decay=0.1)
    built = group_settings(optimizer)
    optimizer.param_groups[0]["rho"] = rho_now
    return optimizer, built


def _settings(**changes) -> OptimizerConfig:
    values = dict(lr=1e-3, min_lr=1e-4, beta1=0.965, beta2=0.99, weight_decay=0.1, rho=0.04)
    return OptimizerConfig(**{**values, **changes})


def test_an_adapted_rho_survives_a_resume_that_changes_another_setting():
    optimizer, built = _sophia_after_load(rho_now=0.0283)
    built[0]["weight_decay"] = 0.3  # as the new settings build it
    apply_changed_settings(optimizer, built, _settings(), _settings(weight_decay=0.3))
    assert optimizer.param_groups[0]["rho"] == 0.0283
    assert optimizer.param_groups[0]["weight_decay"] == 0.3


def test_a_new_rho_replaces_the_adapted_one():
    optimizer, built = _sophia_after_load(rho_now=0.0283)
    built[0]["rho"] = 0.5
    apply_changed_settings(optimizer, built, _settings(), _settings(rho=0.5))
    assert optimizer.param_groups[0]["rho"] == 0.5


@pytest.mark.parametrize("changed", [{}, {"lr": 0.5, "min_lr": 0.1, "grad_clip": 0.5}])
def test_settings_that_do_not_reach_the_groups_leave_every_group_as_saved(changed):
    optimizer, built = _sophia_after_load(rho_now=0.0283)
    optimizer.param_groups[0]["lr"] = 7e-4  # the schedule's lr at the saved step
    apply_changed_settings(optimizer, built, _settings(), _settings(**changed))
    assert optimizer.param_groups[0]["rho"] == 0.0283
    assert optimizer.param_groups[0]["lr"] == 7e-4
