"""Settings honoured or refused, runs never overwritten, checkpoints verified,
every failure a one-line error (exit 2) that names the fix and loses nothing."""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sophia_pytorch.harness import rundir
from sophia_pytorch.harness import trainer as trainer_module
from sophia_pytorch.harness.checkpoint import load_checkpoint, save_checkpoint
from sophia_pytorch.harness.cli import main
from sophia_pytorch.harness.compare.runner import compare
from sophia_pytorch.harness.errors import SophiaError
from sophia_pytorch.harness.schedule import warmup_cosine
from sophia_pytorch.harness.trainer import train
from tests.harness.helpers import corpus_slice, tiny_config


def _small(tmp_path, *extra: str) -> list[str]:
    return ["--data", str(corpus_slice(tmp_path / "data")), "--cache-dir", str(tmp_path / "c"),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--no-progress",
            "--warmup-steps", "1", *extra]


def _rows(run, kind="step") -> list[dict]:
    rows = [json.loads(line, parse_constant=_no_constants)
            for line in (run / "log.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def _no_constants(name: str):
    raise AssertionError(f"{name} is not JSON")


def _one_line_error(capsys, *fragments: str, after_progress: bool = False) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if after_progress:  # compare reports each run on stderr first
        err = err.splitlines(keepends=True)[-1]
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def _trained(tmp_path, name="run", *extra: str):
    run = tmp_path / name
    assert main(["train", *_small(tmp_path, "--max-steps", "3", "--out-dir", str(run),
                                  *extra)]) == 0
    return run


# ----------------------------------------------------------------- 1. settings on resume
def test_resume_applies_a_new_peak_and_floor_lr_and_records_them(tmp_path):
    run = _trained(tmp_path)
    assert main(["train", "--resume", str(run), "--max-steps", "5", "--lr", "0.01",
                 "--min-lr", "0.005", "--no-progress"]) == 0
    expected = [warmup_cosine(s, lr=0.01, min_lr=0.005, warmup_steps=1, max_steps=5)
                for s in (3, 4)]
    assert [row["lr"] for row in _rows(run)][3:] == pytest.approx(expected)
    saved = json.loads((run / "config.json").read_text())["optimizer"]
    assert (saved["lr"], saved["min_lr"]) == (0.01, 0.005)


def test_resume_applies_new_optimizer_hyperparameters_to_the_optimizer(tmp_path):
    run = _trained(tmp_path)
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--rho", "7",
                 "--beta1", "0.5", "--weight-decay", "0.3", "--no-progress"]) == 0
    groups = torch.load(run / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["rho"] for g in groups] == [7.0, 7.0]
    assert [g["betas"][0] for g in groups] == [0.5, 0.5]
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]  # vectors stay undecayed


@pytest.mark.parametrize("flag, value, name", [
    ("--preset", "gpt2-small", "preset"), ("--seed", "3", "seed"),
    ("--n-embd", "64", "n_embd"), ("--optimizer", "adamw", "optimizer"),
    ("--eval-batches", "3", "eval_batches"),
])
def test_resume_refuses_a_setting_it_cannot_apply_naming_it(tmp_path, capsys, flag, value,
                                                            name):
    run = _trained(tmp_path)
    before = (run / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), flag, value, "--no-progress"]) == 2
    _one_line_error(capsys, f"was trained with {name}=", f"drop the {flag} flag")
    assert (run / "log.jsonl").read_text() == before


def test_resume_with_another_batch_size_keeps_counting_tokens(tmp_path):
    run = _trained(tmp_path)  # 3 steps of 4 x 16 tokens
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--batch-size", "8",
                 "--no-progress"]) == 0
    assert [row["tokens"] for row in _rows(run)] == [64, 128, 192, 192 + 128]
    assert json.loads((run / "config.json").read_text())["run"]["batch_size"] == 8


# ------------------------------------------------------------ 2. no abbreviated flags
@pytest.mark.parametrize("args, flag", [
    (["compare", "--lr", "0.01"], "--lr"), (["train", "--max", "3"], "--max"),
    (["train", "--opt", "adamw"], "--opt"), (["compare", "--optim", "adamw"], "--optim"),
])
def test_an_abbreviated_flag_is_not_read_as_a_longer_one(tmp_path, capsys, args, flag):
    out = "--out" if args[0] == "compare" else "--out-dir"
    bounded = _small(tmp_path, "--max-steps", "1", out, str(tmp_path / "run"))
    assert main([args[0], *bounded, *args[1:]]) == 2
    _one_line_error(capsys, f"unrecognized arguments: {flag}")


# ------------------------------------------------------------------------- 3. run folders
def test_a_new_run_into_a_folder_holding_a_run_is_refused(tmp_path, capsys):
    run = _trained(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", *_small(tmp_path, "--max-steps", "2", "--out-dir", str(run))]) == 2
    _one_line_error(capsys, "already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_run_in_a_folder(tmp_path):
    run = _trained(tmp_path)
    assert main(["train", *_small(tmp_path, "--max-steps", "2", "--out-dir", str(run),
                                  "--overwrite")]) == 0
    assert [row["step"] for row in _rows(run)] == [1, 2]


def test_a_second_process_on_a_folder_in_use_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with rundir.RunLock(run):  # another process's run, as far as the lock file says
        assert main(["train", *_small(tmp_path, "--max-steps", "1", "--out-dir",
                                      str(run))]) == 2
    _one_line_error(capsys, "is in use by process", str(os.getpid()))
    assert not (run / "log.jsonl").exists()


def test_a_lock_left_by_a_killed_process_is_recognised_as_stale(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sophia_pytorch.harness.rundir import "
         "RunLock; RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
         str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SophiaError, match=f"in use by process {holder.pid}"):
            rundir.RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").exists()  # the killed process could not remove it
    train(tiny_config(tmp_path, max_steps=1, out_dir=str(run)))


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    config = tiny_config(tmp_path, max_steps=1)
    train(config)
    with rundir.RunLock(config.run.out_dir):
        pass


def test_an_automatic_run_folder_never_reuses_one_holding_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda *args: "20260101-000000")
    first = rundir.make_run_dir("", "tiny", "adamw")
    first.mkdir(parents=True)
    (first / "log.jsonl").write_text("")
    second = rundir.make_run_dir("", "tiny", "adamw")
    assert second != first and second.name.startswith(first.name)


# ------------------------------------------------------------------- 4. checkpoint integrity
def _flip_a_byte_inside_a_tensor(path) -> None:
    data = bytearray(path.read_bytes())
    marker = torch.full((4,), 3.0).numpy().tobytes()
    data[data.find(marker) + 2001] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_bytes_inside_a_tensor_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.full((1000,), 3.0)}, "step": 1}, path)
    _flip_a_byte_inside_a_tensor(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(SophiaError, match="checksum") as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_temp_files_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "checkpoint.pt"
    leftover = tmp_path / ".checkpoint.pt.k1ll3d.tmp"
    leftover.write_bytes(b"PK half a checkpoint")
    save_checkpoint({"model": {}, "step": 1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# --------------------------------------------------------------------- 5. non-finite values
@pytest.mark.parametrize("flag", ["--lr", "--min-lr", "--rho", "--weight-decay", "--beta1",
                                  "--grad-clip", "--refresh-fraction", "--dropout"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_hyperparameter_is_refused(tmp_path, capsys, flag, value):
    bounded = _small(tmp_path, "--max-steps", "1", "--out-dir", str(tmp_path / "run"))
    assert main(["train", *bounded, f"{flag}={value}"]) == 2
    _one_line_error(capsys, f"{flag.lstrip('-').replace('-', '_')} must be finite")


@pytest.mark.parametrize("grid", ["inf", "1,nan", "1e400"])
def test_a_non_finite_lr_grid_is_refused(tmp_path, capsys, grid):
    bounded = _small(tmp_path, "--max-steps", "1", "--out", str(tmp_path / "cmp"))
    assert main(["compare", *bounded, "--lr-grid", grid]) == 2
    _one_line_error(capsys, "--lr-grid", "finite")


def _poison_weights_after_step(monkeypatch, step: int) -> None:
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoning(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.nan)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning)


def test_non_finite_weights_are_never_saved_and_the_last_finite_checkpoint_is_named(
        tmp_path, monkeypatch):
    _poison_weights_after_step(monkeypatch, 3)
    config = tiny_config(tmp_path, optimizer="adamw", max_steps=4, checkpoint_every=2,
                         eval_every=0)
    with pytest.raises(SophiaError, match=r"not finite.*step 2") as raised:
        train(config)
    assert str(config.run.out_dir) in str(raised.value)
    saved = load_checkpoint(config.run.out_dir)
    assert saved["train_state"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_the_divergence_message_points_to_a_checkpoint_from_before_the_bad_streak(
        tmp_path, monkeypatch):
    real = trainer_module.lm_loss
    calls = {"n": 0}

    def bad_from_the_third_step(logits, targets):
        calls["n"] += 1
        return real(logits, targets) * (math.nan if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(trainer_module, "lm_loss", bad_from_the_third_step)
    config = tiny_config(tmp_path, optimizer="adamw", max_steps=10, checkpoint_every=1,
                         eval_every=0, max_bad_steps=3)
    with pytest.raises(SophiaError, match=r"3 steps in a row.*--resume .* \(step 2\)"):
        train(config)
    assert load_checkpoint(config.run.out_dir)["train_state"]["step"] == 2


def test_a_non_finite_validation_loss_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "validation_loss", lambda *args: math.nan)
    with pytest.raises(SophiaError, match="validation loss .*not finite"):
        train(tiny_config(tmp_path, max_steps=2, eval_every=2))


def test_compare_records_a_diverged_grid_point_and_tunes_on_the_rest(tmp_path):
    base = tiny_config(tmp_path, optimizer="adamw", max_steps=2, eval_every=2)
    summary = compare(base, optimizers=["adamw"], lr_multipliers=[1.0, 1e35],
                      out_dir=tmp_path / "cmp")
    runs = {run["lr_multiplier"]: run for run in summary.results["runs"]}
    assert math.isfinite(runs[1.0]["final_val_loss"]) and runs[1e35]["diverged"]
    assert summary.results["best_multipliers"]["adamw"] == 1.0
    json.loads((tmp_path / "cmp" / "results.json").read_text(), parse_constant=_no_constants)


def test_compare_whose_optimizer_diverged_everywhere_exits_2_after_the_report(tmp_path,
                                                                             capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "adamw", "--lr-grid", "1e35",
                 *_small(tmp_path, "--max-steps", "2", "--out", str(out))]) == 2
    _one_line_error(capsys, "adamw diverged at every lr", "--lr-grid", after_progress=True)
    assert (out / "report.md").exists()


# ------------------------------------------------ 6. environment failures: one line, exit 2
def _refuse_writes_under(monkeypatch, folder, code=errno.EROFS) -> None:
    """Writes below ``folder`` fail as on a read-only file system (tests may run as root)."""
    folder = str(folder)
    strerror = os.strerror(code)

    def guard(path):
        if str(path).startswith(folder):
            raise OSError(code, strerror, str(path))

    real_mkdir, real_os_open, real_open = os.mkdir, os.open, builtins.open

    def mkdir(path, *args, **kwargs):
        guard(path)
        return real_mkdir(path, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            guard(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            guard(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch, code):
    corpus_slice(tmp_path / "data")
    _refuse_writes_under(monkeypatch, tmp_path / "ro", code)
    assert main(["train", *_small(tmp_path, "--max-steps", "1", "--out-dir",
                                  str(tmp_path / "ro" / "run"))]) == 2
    _one_line_error(capsys, "cannot write", "--out-dir")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores modes")
def test_a_folder_without_write_permission_is_one_line(tmp_path, capsys):
    corpus_slice(tmp_path / "data")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["train", *_small(tmp_path, "--max-steps", "1", "--out-dir",
                                  str(locked / "run"))]) == 2
    _one_line_error(capsys, "cannot write", "--out-dir")


def test_a_read_only_cache_folder_is_one_line(tmp_path, capsys, monkeypatch):
    corpus_slice(tmp_path / "data")
    _refuse_writes_under(monkeypatch, tmp_path / "c")
    assert main(["train", *_small(tmp_path, "--max-steps", "1", "--out-dir",
                                  str(tmp_path / "run"))]) == 2
    _one_line_error(capsys, "cannot write", "--cache-dir")


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_an_output_path_that_is_or_lies_under_a_file_is_one_line(tmp_path, capsys, where):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("precious\n")
    out = blocker if where == "file" else blocker / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "1", "--out-dir", str(out))]) == 2
    _one_line_error(capsys, "--out-dir")
    assert blocker.read_text() == "precious\n"


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save
    saves = {"n": 0}

    def full_on_second_save(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_second_save)
    assert main(["train", *_small(tmp_path, "--max-steps", "4", "--checkpoint-every", "2",
                                  "--out-dir", str(run))]) == 2
    _one_line_error(capsys, "No space left on device", "free some disk space")
    monkeypatch.undo()
    assert load_checkpoint(run)["train_state"]["step"] == 2
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # nothing lost


def test_a_torn_last_log_line_does_not_stop_a_resume(tmp_path):
    run = _trained(tmp_path)
    with (run / "log.jsonl").open("a") as handle:
        handle.write('{"kind": "step", "step": 4, "lo')
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--no-progress"]) == 0
    assert [row["step"] for row in _rows(run)] == [1, 2, 3, 4]


@pytest.mark.parametrize("content, message", [
    (b"just some text\n", "cannot read checkpoint"),
    (None, "lacks"),
])
def test_a_resume_target_that_is_not_a_training_checkpoint_is_one_line(tmp_path, capsys,
                                                                     content, message):
    path = tmp_path / "checkpoint.pt"
    if content is None:
        save_checkpoint({"model": {}, "step": 3}, path)
    else:
        path.write_bytes(content)
    assert main(["train", "--resume", str(path)]) == 2
    _one_line_error(capsys, message, "--resume")


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "1000000000000", "memory"),
    ("--n-embd", "100000000", "memory"),
    ("--grad-accum", "1000000000000", "memory"),
    ("--seed", str(2**64), "seed"),
    ("--seed", "-1", "seed"),
    ("--threads", "100000", "threads"),
])
def test_impossible_sizes_seeds_and_thread_counts_are_one_line(tmp_path, capsys, flag, value,
                                                             message):
    assert main(["train", *_small(tmp_path, "--max-steps", "1", "--out-dir",
                                  str(tmp_path / "run")), flag, value]) == 2
    _one_line_error(capsys, message)


def test_threads_100000_in_a_fresh_process_is_an_error_not_a_crash(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sophia_pytorch.harness", "train",
                           "--threads", "100000"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert "--threads" in done.stderr or "threads" in done.stderr


# ------------------------------------------------------------------------------ 7. smaller
def test_a_single_binary_file_as_data_is_refused(tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 100)
    assert main(["train", "--data", str(binary), "--cache-dir", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "binary", "text file")


def test_a_skipped_step_is_logged_as_json_null_not_nan(tmp_path, monkeypatch):
    real = trainer_module.lm_loss
    calls = {"n": 0}

    def nan_on_second(logits, targets):
        calls["n"] += 1
        return real(logits, targets) * (math.nan if calls["n"] == 2 else 1.0)

    monkeypatch.setattr(trainer_module, "lm_loss", nan_on_second)
    result = train(tiny_config(tmp_path, optimizer="adamw", max_steps=3, eval_every=0))
    rows = _rows(result.run_dir)
    assert rows[1]["skipped"] and rows[1]["loss"] is None


def test_help_shows_the_thread_count_the_preset_uses(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--threads VALUE (tiny: 1)" in help_text


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_cache_and_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        config = tiny_config(tmp_path, max_steps=1)
        train(config)
    finally:
        os.umask(old)
    cache = next((tmp_path / "cache").iterdir())
    for path in [cache, *cache.iterdir(), tmp_path / "run" / "checkpoint.pt"]:
        assert path.stat().st_mode & 0o044 == 0o044, path  # group and others may read


def test_a_checkpoint_is_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint({"step": 1}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644
