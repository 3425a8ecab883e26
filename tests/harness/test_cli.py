"""The ``sophia`` command: train, resume, compare, TOML settings and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sophia_pytorch.harness.cli import main
from sophia_pytorch.harness.schedule import warmup_cosine
from tests.harness.helpers import corpus_slice


def _small(tmp_path, *extra):
    return ["--data", str(corpus_slice(tmp_path / "data")), "--cache-dir", str(tmp_path / "c"),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--no-progress",
            *extra]


def test_train_then_resume_to_more_steps(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "3", "--warmup-steps", "1",
                                  "--out-dir", str(run))]) == 0
    assert "run folder" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--max-steps", "5", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5]
    config = json.loads((run / "config.json").read_text())
    lrs = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "step"]
    settings = config["optimizer"]
    expected = [warmup_cosine(s, lr=settings["lr"], min_lr=settings["min_lr"],
                              warmup_steps=settings["warmup_steps"], max_steps=5) for s in (3, 4)]
    assert lrs[3:] == pytest.approx(expected)  # the schedule was stretched to the new length


def test_toml_file_overrides_the_preset_and_flags_override_the_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nn_embd = 48\nn_head = 3\n[optimizer]\nname = "adamw"\n')
    run = tmp_path / "run"
    args = ["train", "--config", str(toml), *_small(tmp_path, "--max-steps", "1")]
    args = [a for a in args if a not in ("--n-embd", "32")] + ["--n-head", "4", "--out-dir",
                                                                str(run)]
    assert main(args) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["model"]["n_embd"], config["model"]["n_head"]) == (48, 4)
    assert config["optimizer"]["name"] == "adamw"


def test_compare_muon_against_adamw_prints_where_the_report_is(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "muon,adamw",
                 *_small(tmp_path, "--max-steps", "2", "--out", str(out))]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed and "plots:" in printed
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [run["optimizer"] for run in runs] == ["muon", "adamw"]


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["train", "--optimizer", "sophia-g"], "unknown optimizer 'sophia-g' (did you mean "),
    (["train", "--lr", "fast"], "bad value 'fast' for lr: expected float"),
    (["train", "--n-layer", "0"], "n_layer must be at least 1"),
    (["train", "--data", "/no/such/corpus.txt"], "data path '/no/such/corpus.txt' does not exist"),
    (["train", "--resume", "/no/such/run"], "does not exist"),
    (["train", "--config", "/no/such.toml"], "config file '/no/such.toml' does not exist"),
    (["train", "--warp-speed", "9"], "unrecognized arguments: --warp-speed 9"),
    (["train", "--hessian-every", "2"], "unrecognized arguments: --hessian-every 2"),
    (["train", "--refresh-every", "0"], "refresh_every must be at least 1"),
    (["compare", "--optimizers", "adamw,sgd"], "unknown optimizer 'sgd'"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys, args, message):
    assert main(args + ["--cache-dir", str(tmp_path)] if args[0] != "fly" else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1


def test_unreadable_checkpoint_is_one_line_without_traceback(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    command = [sys.executable, "-m", "sophia_pytorch.harness", "train", "--resume", str(tmp_path)]
    done = subprocess.run(command,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: cannot read checkpoint")
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_tensorboard_without_the_package_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    args = ["train", *_small(tmp_path, "--max-steps", "1", "--tensorboard", "--out-dir",
                             str(tmp_path / "run"))]
    assert main(args) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
