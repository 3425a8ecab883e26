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
    (["train", "--lr", "fast"], "bad value 'fast' for --lr: expected float"),
    (["train", "--tokenizer", "bpx"],
     "unknown tokenizer 'bpx' (did you mean 'bpe'?) in --tokenizer"),
    (["train", "--n-layers", "2"],
     "unrecognized arguments: --n-layers 2 (did you mean '--n-layer'?)"),
    (["train", "--hessian-every", "2"], "--hessian-every is now --refresh-every"),
    (["train", "--n-layer", "0"], "n_layer must be at least 1"),
    (["train", "--data", "/no/such/corpus.txt"], "data path '/no/such/corpus.txt' does not exist"),
    (["train", "--resume", "/no/such/run"], "does not exist"),
    (["train", "--config", "/no/such.toml"], "config file '/no/such.toml' does not exist"),
    (["train", "--warp-speed", "9"], "unrecognized arguments: --warp-speed 9"),
    (["train", "--refresh-every", "0"], "refresh_every must be at least 1"),
    (["compare", "--optimizers", "adamw,sgd"], "unknown optimizer 'sgd'"),
    (["fly"], "invalid choice: 'fly'"),
    (["trian"], "invalid choice: 'trian' (choose from 'train', 'compare', 'presets') (did you "
                "mean 'train'?)"),
])
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys, args, message):
    assert main(args + ["--cache-dir", str(tmp_path)] if args[0] in ("train", "compare")
                else args) == 2
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


def test_train_help_lists_every_optimizer_and_each_setting_with_choices(capsys):
    from sophia_pytorch.harness.config import TOKENIZERS, optimizer_names

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert f"the optimizer; one of {', '.join(optimizer_names())}" in text
    assert f"one of {', '.join(TOKENIZERS)}" in text
    assert "registry" not in text


@pytest.mark.parametrize("names, message", [
    ("sophiag,adamww", "unknown optimizer 'adamww' (did you mean 'adamw'?) in --optimizers"),
    ("sophiag,,adamw", "--optimizers 'sophiag,,adamw' has an empty item"),
    ("sophiag,adamw,", "has an empty item"),
    (",", "has an empty item"),
    ("adamw,sophiag,adamw", "--optimizers names adamw twice"),
])
def test_a_bad_optimizer_list_is_refused_before_anything_trains(tmp_path, capsys, names,
                                                               message):
    out = tmp_path / "cmp"
    assert main(["compare", *_small(tmp_path, "--max-steps", "2"), "--optimizers", names,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_an_empty_item_in_the_lr_grid_is_refused(tmp_path, capsys):
    assert main(["compare", *_small(tmp_path), "--lr-grid", "1,,3"]) == 2
    assert "--lr-grid '1,,3' has an empty item" in capsys.readouterr().err


def _corpus(tmp_path, chars: int):
    path = tmp_path / "small.txt"
    path.write_text(corpus_slice(tmp_path / "data").read_text()[:chars], encoding="utf-8")
    return path


def _train_on(tmp_path, data, *flags):
    return main(["train", "--data", str(data), "--cache-dir", str(tmp_path / "c"),
                 "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-steps", "1",
                 "--no-progress", "--out-dir", str(tmp_path / "run"), *flags])


def test_an_empty_validation_split_advises_more_text_or_a_larger_val_fraction(tmp_path, capsys):
    # 1000 bytes: four chunks of 256 tokens, and the first validation chunk is the 20th.
    assert _train_on(tmp_path, _corpus(tmp_path, 1000), "--block-size", "8") == 2
    err = capsys.readouterr().err
    assert "the validation split of" in err and "has 0 tokens" in err
    assert "more text (--data)" in err and "a larger --val-fraction (now 0.05" in err
    assert "block" not in err  # a shorter context cannot fill an empty split


def test_an_empty_validation_split_is_filled_by_the_advised_val_fraction(tmp_path, capsys):
    assert _train_on(tmp_path, _corpus(tmp_path, 1000), "--block-size", "8",
                     "--val-fraction", "0.3", "--eval-batches", "1") == 0


def test_a_short_validation_split_names_the_flags_that_help(tmp_path, capsys):
    # 5120 bytes: twenty chunks of 256 tokens, one of them validation: under --block-size 300.
    assert _train_on(tmp_path, _corpus(tmp_path, 5120), "--block-size", "300") == 2
    err = capsys.readouterr().err
    assert "the validation split of" in err and "has 256 tokens" in err
    assert "--val-fraction" in err and "a smaller --block-size" in err
    assert "block_size" not in err
