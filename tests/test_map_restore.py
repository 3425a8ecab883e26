"""experiments/map_restore.py: a committed results.json becomes a compare folder that
``compare`` extends, reading the old runs back and training only the new one."""

from __future__ import annotations

import json
import shutil

from experiments import map_restore
from sophia_pytorch.harness.compare.runner import compare
from tests.harness.helpers import tiny_config


def test_restored_runs_are_read_back_and_only_new_runs_train(tmp_path, capsys):
    base = tiny_config(tmp_path, max_steps=4, eval_every=2)
    first = tmp_path / "first"
    compare(base, optimizers=["adamw", "sophiag"], lr_multipliers=[1.0], seeds=[0],
            out_dir=first)
    committed = tmp_path / "results.json"
    shutil.copy(first / "results.json", committed)
    shutil.rmtree(first)  # what a clone has: the results.json, no run folders

    written, refused = map_restore.restore(committed, tmp_path / "again")
    assert len(written) == 2 and refused == []
    capsys.readouterr()
    compare(base, optimizers=["adamw", "sophiag"], lr_multipliers=[1.0, 2.0], seeds=[0],
            out_dir=tmp_path / "again")
    log = capsys.readouterr().err
    assert log.count("(found)") == 2 and log.count("(trained)") == 2  # x2 of each is new
    old = {(r["optimizer"], r["lr_multiplier"]): r for r in
           json.loads(committed.read_text())["runs"]}
    new = json.loads((tmp_path / "again" / "results.json").read_text())["runs"]
    assert len(new) == 4
    for run in new:
        if run["lr_multiplier"] == 1.0:  # read back as recorded, curve and all
            assert run == old[(run["optimizer"], 1.0)]


def test_a_restored_run_with_other_settings_is_trained_not_mixed_in(tmp_path, capsys):
    base = tiny_config(tmp_path, max_steps=4, eval_every=2)
    compare(base, optimizers=["adamw"], seeds=[0], out_dir=tmp_path / "first")
    map_restore.restore(tmp_path / "first" / "results.json", tmp_path / "again")
    capsys.readouterr()
    compare(tiny_config(tmp_path, max_steps=6, eval_every=2), optimizers=["adamw"], seeds=[0],
            out_dir=tmp_path / "again", overwrite=True)
    assert "(trained)" in capsys.readouterr().err


def test_a_run_trained_at_another_lr_than_todays_row_is_not_restored(tmp_path, capsys,
                                                                      monkeypatch):
    """The restore used to write today's row into every record, so compare's same-settings
    check always passed: a run trained at lr 3e-3 came back as "found" under a row of 1e-3."""
    import dataclasses

    from sophia_pytorch.harness.config import PRESETS

    base = tiny_config(tmp_path, max_steps=4, eval_every=2)
    compare(base, optimizers=["adamw", "sophiag"], seeds=[0], out_dir=tmp_path / "first")
    rows = dict(PRESETS["tiny"].optimizers)
    rows["adamw"] = dataclasses.replace(rows["adamw"], lr=rows["adamw"].lr / 3,
                                        min_lr=rows["adamw"].min_lr / 3)  # retuned since
    rows["sophiag"] = dataclasses.replace(rows["sophiag"], betas=(0.95, 0.99))
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(PRESETS["tiny"], optimizers=rows))
    written, refused = map_restore.restore(tmp_path / "first" / "results.json",
                                              tmp_path / "again")
    assert written == []
    assert any(line.startswith("adamw-x1-seed0: trained at lr 0.003") for line in refused)
    assert any(line.startswith("sophiag-x1-seed0: trained with beta1 0.9 (today 0.95)")
               for line in refused)
    capsys.readouterr()
    compare(base, optimizers=["adamw"], seeds=[0], out_dir=tmp_path / "again")
    assert "(trained)" in capsys.readouterr().err and "(found)" not in capsys.readouterr().err
