"""Nothing lost, nothing silent. Each fault is the real one where this
machine allows it (a real signal to a real ``sophia train``, a real write failure)."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sophia_pytorch.harness.cli import main
from sophia_pytorch.harness.rundir import RunLog
from tests.harness.helpers import corpus_slice, one_line_error

ROOT = Path(__file__).resolve().parents[2]


def _small(tmp_path, *extra: str) -> list[str]:
    return ["--data", str(corpus_slice(tmp_path / "data")), "--cache-dir", str(tmp_path / "c"),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--no-progress",
            "--warmup-steps", "1", *extra]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder`` (folders as None), by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "step"]


# ------------------------------------------------------- item 1: --overwrite deletes only ours
def _hugging_face_output(folder: Path) -> Path:
    """A folder shaped like a transformers Trainer's output."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                    "model_type": "gpt2"}))
    for sub in ("checkpoint-500", "checkpoint-best"):
        (folder / sub).mkdir()
        (folder / sub / "model.safetensors").write_bytes(b"weights")
        (folder / sub / "trainer_state.json").write_text("{}")
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out.tfevents.1").write_bytes(b"events")
    return folder


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_folder_sophia_did_not_write_is_refused_and_nothing_of_it_deleted(
        tmp_path, capsys, overwrite):
    folder = _hugging_face_output(tmp_path / "hf")
    before = _snapshot(folder)
    flags = ["--overwrite"] if overwrite else []
    assert main(["train", *_small(tmp_path, "--max-steps", "2", "--out-dir", str(folder)),
                 *flags]) == 2
    one_line_error(capsys, "config.json", "no sophia run wrote", "another --out-dir")
    assert _snapshot(folder) == before


def test_overwrite_removes_only_the_files_a_run_writes(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "3", "--out-dir", str(run))]) == 0
    (run / "notes.txt").write_text("mine")
    (run / "checkpoint-500").mkdir()
    (run / "checkpoint-500" / "model.safetensors").write_bytes(b"weights")
    assert main(["train", *_small(tmp_path, "--max-steps", "2", "--out-dir", str(run),
                                  "--overwrite")]) == 0
    assert [row["step"] for row in _steps(run)] == [1, 2]
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "checkpoint-500" / "model.safetensors").read_bytes() == b"weights"


def test_a_run_without_a_checkpoint_is_not_offered_for_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "2", "--out-dir", str(run))]) == 0
    (run / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert main(["train", *_small(tmp_path, "--max-steps", "2", "--out-dir", str(run))]) == 2
    err = one_line_error(capsys, "without a checkpoint", "--overwrite")
    assert "--resume" not in err


# --------------------------------------------- item 2: resume rewrites log.jsonl atomically
def _resume_with_file_size_limit(run: Path, limit: int) -> subprocess.CompletedProcess:
    """``sophia train --resume run`` in a process that may write no file past ``limit``
    bytes (RLIMIT_FSIZE): its first larger write fails for real, with EFBIG."""

    def limit_writes() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "sophia_pytorch.harness", "train", "--resume", str(run),
         "--no-progress"],
        capture_output=True, text=True, preexec_fn=limit_writes, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])})


def test_a_write_failing_while_resume_rewrites_the_log_keeps_the_log(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "4", "--out-dir", str(run),
                                  "--checkpoint-every", "2")]) == 0
    with (run / "log.jsonl").open("a") as log:  # what a crash after step 4 left: a torn line
        log.write('{"kind": "step", "step": 5, "lo')
    before = (run / "log.jsonl").read_bytes()
    assert len(before) > 1024
    finished = _resume_with_file_size_limit(run, 1024)
    assert finished.returncode == 2, finished.stderr
    assert "Traceback" not in finished.stderr and str(run) in finished.stderr
    assert (run / "log.jsonl").read_bytes() == before  # before the fix: cut at 1024 bytes
    assert not list(run.glob(".log.jsonl.*.tmp"))


def test_every_damaged_log_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "log.jsonl"
    good = [{"kind": "step", "step": 1, "loss": 5.0}, {"kind": "eval", "step": 2, "val_loss": 4.0}]
    path.write_bytes(b"\n".join([
        json.dumps(good[0]).encode(), b'{"kind": "step", "step": \xff\xfe 2}',
        b'{"kind": "step", "step": Infinity}', b'{"kind": "step", "step": NaN}',
        b'{"kind": "step", "step": 1e400}', b'[1, 2]', b'{"kind": "step", "step": true}',
        json.dumps(good[1]).encode(), b'{"kind": "step", "step": 3}', b'{"kind": "st',
    ]))
    RunLog(tmp_path, keep_until_step=2, tensorboard=False)
    assert [json.loads(line) for line in path.read_text().splitlines()] == good


def test_resume_over_a_log_with_damaged_lines_is_not_a_traceback(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "2", "--out-dir", str(run))]) == 0
    with (run / "log.jsonl").open("ab") as log:
        log.write(b'{"kind": "step", "step": Infinity}\n\xff\xfe\n')
    assert main(["train", "--resume", str(run), "--max-steps", "3", "--no-progress"]) == 0
    assert [row["step"] for row in _steps(run)] == [1, 2, 3]


# ------------------------------------- item 3: SIGINT / SIGTERM save, then --resume continues
def _sophia(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sophia_pytorch.harness", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])})


def _step_lines(run: Path) -> int:
    try:
        return sum(b'"kind": "step"' in line
                   for line in (run / "log.jsonl").read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def _settings(folder: Path) -> list[str]:
    return _small(folder, "--max-steps", "60", "--eval-every", "30", "--threads", "1")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """The uninterrupted run, by the same command in another process."""
    folder = tmp_path_factory.mktemp("whole")
    whole = _sophia("train", *_settings(folder), "--out-dir", str(folder / "run"))
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_step_boundary_and_resume_equals_the_whole_run(
        whole_run, signum):
    tmp_path = whole_run  # same data and cache paths: the same settings
    settings = _settings(tmp_path)

    run = tmp_path / f"stopped-{signum}"
    process = _sophia("train", *settings, "--out-dir", str(run))  # --checkpoint-every 0
    deadline = time.monotonic() + 300
    while _step_lines(run) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signum)
    assert process.wait(timeout=300) == 128 + signum
    stderr = process.stderr.read()
    assert "Traceback" not in stderr and f"sophia train --resume {run}" in stderr, stderr
    stopped = _step_lines(run)
    assert 5 <= stopped < 60, "the signal came too late to interrupt the run"
    saved = json.loads(subprocess.check_output(
        [sys.executable, "-c", "import sys, torch, json; print(json.dumps(torch.load("
         "sys.argv[1], weights_only=True)['train_state']['step']))", str(run / "checkpoint.pt")]))
    assert saved == stopped  # saved at the boundary of the last step logged

    resumed = _sophia("train", "--resume", str(run), "--no-progress")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    ours = [(row["step"], row["loss"]) for row in _steps(run)]
    theirs = [(row["step"], row["loss"]) for row in _steps(tmp_path / "run")]
    assert ours == theirs


# --------------------------------------------------- items 11, 12, 8: the disk and the cache
@pytest.fixture
def small_disk(tmp_path):
    """A real, small file system (tmpfs) mounted for the test: writes past it fail with
    ENOSPC. Needs the right to mount (root, or CAP_SYS_ADMIN)."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}): the full-"
                        "disk test needs root or CAP_SYS_ADMIN")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` to the last byte, then free ``leave`` bytes of it."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_a_really_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(
        tmp_path, capsys, small_disk):
    run = small_disk("4m") / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "2", "--out-dir", str(run))]) == 0
    kept = (run / "checkpoint.pt").read_bytes()
    _fill(run.parent, leave=32 * 1024)  # room for the log and config, not a checkpoint
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--no-progress"]) == 2
    one_line_error(capsys, "No space left on device", "free some disk space", "--out-dir")
    assert (run / "checkpoint.pt").read_bytes() == kept
    assert not list(run.glob(".checkpoint.pt.*.tmp"))


def test_a_really_full_token_cache_is_one_line_and_leaves_no_partial_entry(
        tmp_path, capsys, small_disk):
    cache = small_disk("64k") / "cache"
    args = _small(tmp_path, "--max-steps", "1", "--out-dir", str(tmp_path / "run"))
    args[args.index("--cache-dir") + 1] = str(cache)
    assert main(["train", *args]) == 2
    one_line_error(capsys, "No space left on device", "--cache-dir")
    assert list(cache.iterdir()) == []


def _cache_entry(tmp_path) -> tuple[Path, dict]:
    from sophia_pytorch.harness.data import prepare_data

    data = prepare_data(str(corpus_slice(tmp_path / "data")), cache_dir=tmp_path / "cache")
    whole = {"train": data.train.tobytes(), "val": data.val.tobytes()}
    return data.folder, whole


def _damage_meta_torn(folder: Path) -> None:
    (folder / "meta.json").write_bytes(b'{"source": "x", "vocab')


def _damage_meta_types(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "train": "many"}))


def _damage_meta_not_utf8(folder: Path) -> None:
    (folder / "meta.json").write_bytes(b"\xff\xfe{}")


def _damage_train_truncated(folder: Path) -> None:  # item 8
    os.truncate(folder / "train.bin", (folder / "train.bin").stat().st_size // 2)


def _damage_train_missing(folder: Path) -> None:
    (folder / "train.bin").unlink()


def _damage_val_empty(folder: Path) -> None:
    (folder / "val.bin").write_bytes(b"")


@pytest.mark.parametrize("damage", [_damage_meta_torn, _damage_meta_types, _damage_meta_not_utf8,
                                    _damage_train_truncated, _damage_train_missing,
                                    _damage_val_empty])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, damage):
    from sophia_pytorch.harness.data import prepare_data

    folder, whole = _cache_entry(tmp_path)
    damage(folder)
    data = prepare_data(str(corpus_slice(tmp_path / "data")), cache_dir=tmp_path / "cache")
    assert data.folder == folder
    assert {"train": data.train.tobytes(), "val": data.val.tobytes()} == whole


def test_a_cache_folder_that_cannot_exist_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOPHIA_CACHE", "/proc/nope/x")
    args = _small(tmp_path, "--max-steps", "1", "--out-dir", str(tmp_path / "run"))
    del args[args.index("--cache-dir"):args.index("--cache-dir") + 2]
    assert main(["train", *args]) == 2
    one_line_error(capsys, "/proc/nope/x", "$SOPHIA_CACHE")


# -------------------------------------------------------------- item 5: --data "" refused
def test_an_empty_data_path_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a corpus " * 1000)
    args = _small(tmp_path, "--max-steps", "1", "--out-dir", str(tmp_path / "run"))
    args[args.index("--data") + 1] = ""
    assert main(["train", *args]) == 2
    one_line_error(capsys, "--data is empty")
    assert not (tmp_path / "c").exists()  # nothing was tokenized


# ------------------------------------------------- item 10: --eval-every 0 still evaluates
def test_eval_every_0_evaluates_after_the_last_step(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "3", "--eval-every", "0",
                                  "--out-dir", str(run))]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    evals = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [row["step"] for row in evals] == [3] and evals[0]["val_loss"] > 0


# ------------------------------------------ item 7: the package's version and commit, not cwd's
def _provenance(cwd: Path, package_root: Path) -> dict:
    code = ("import json; from sophia_pytorch.harness.compare.report import package_provenance;"
            " print(json.dumps(package_provenance()))")
    return json.loads(subprocess.check_output(
        [sys.executable, "-c", code], cwd=cwd, text=True,
        env={**os.environ, "PYTHONPATH": str(package_root)}))


def _git(*args: str, cwd: Path) -> str:
    return subprocess.check_output(["git", *args], cwd=cwd, text=True).strip()


@pytest.fixture
def other_repository(tmp_path) -> Path:
    """The current folder of a run: some other git repository, with a commit of its own."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    _git("init", "-q", cwd=folder)
    (folder / "a.txt").write_text("a")
    _git("add", "a.txt", cwd=folder)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", cwd=folder)
    return folder


@pytest.mark.slow  # a fresh interpreter imports torch
def test_the_report_records_the_package_commit_not_the_current_folders(other_repository):
    found = _provenance(other_repository, ROOT / "src")
    ours = _git("rev-parse", "--short", "HEAD", cwd=ROOT)
    assert found["commit"].removesuffix("+dirty") == ours
    assert found["commit"] != _git("rev-parse", "--short", "HEAD", cwd=other_repository)
    assert found["version"] != "unknown"


@pytest.mark.slow
def test_a_package_outside_a_checkout_has_an_unknown_commit(tmp_path, other_repository):
    import shutil

    copy = other_repository / "site-packages"  # inside a repository that does not track it
    shutil.copytree(ROOT / "src" / "sophia_pytorch", copy / "sophia_pytorch")
    assert _provenance(tmp_path, copy)["commit"] == "unknown"


# ------------------------------------------------------------------------------ item 13
def test_a_seed_count_past_the_limit_is_refused_before_the_list_is_built(tmp_path, capsys):
    assert main(["compare", "--seeds", "10000000000",
                 *_small(tmp_path, "--max-steps", "1", "--out", str(tmp_path / "cmp"))]) == 2
    one_line_error(capsys, "--seeds 10000000000", "1 to 1000")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("grid", [(0.1234567, 0.1234568), (1.0, 1.0000001), (1e-7, 1.00001e-7)])
def test_lr_grid_points_never_share_a_run_folder(tmp_path, grid):
    from sophia_pytorch.harness.compare.runner import _Runs, multiplier_name

    runs = _Runs(None, {}, tmp_path, overwrite=False)  # type: ignore[arg-type]
    folders = {runs.folder("adamw", m, 0) for m in grid}
    assert len(folders) == len(grid)
    assert [float(multiplier_name(m)) for m in grid] == list(grid)  # the name is exact


def test_the_usual_multipliers_keep_their_short_folder_names(tmp_path):
    from sophia_pytorch.harness.compare.runner import multiplier_name

    assert [multiplier_name(m) for m in (1.0, 0.5, 2.0, 0.25, 1e-3)] == \
        ["1", "0.5", "2", "0.25", "0.001"]


def test_resuming_a_plain_pickle_is_one_line_without_torchs_warning(tmp_path, capsys, recwarn):
    import pickle

    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"model": [1, 2, 3]}))
    assert main(["train", "--resume", str(path), "--no-progress"]) == 2
    one_line_error(capsys, "cannot read checkpoint", "--resume")
    assert [str(w.message) for w in recwarn] == []


# ------------------------------- item 3, in this process: a real signal raised during a step
def _signal_at(step: int, signum: int = signal.SIGINT):
    def on_step(record: dict) -> None:
        if record["step"] == step:
            signal.raise_signal(signum)

    return on_step


def test_sigint_in_process_saves_with_checkpoint_every_0_and_resume_matches(tmp_path, capsys,
                                                                            monkeypatch):
    from sophia_pytorch.harness import trainer

    whole = tmp_path / "whole"
    assert main(["train", *_small(tmp_path, "--max-steps", "5", "--out-dir", str(whole))]) == 0
    run = tmp_path / "run"
    real = trainer.Trainer.__init__

    def with_signal(self, config, **kwargs):
        real(self, config, **{**kwargs, "on_step": _signal_at(3)})

    monkeypatch.setattr(trainer.Trainer, "__init__", with_signal)
    capsys.readouterr()
    assert main(["train", *_small(tmp_path, "--max-steps", "5", "--out-dir", str(run))]) == 130
    err = capsys.readouterr().err
    assert err == f"interrupted: SIGINT at step 3 (saved); continue with `sophia train " \
                  f"--resume {run}`\n"
    monkeypatch.setattr(trainer.Trainer, "__init__", real)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert [r["loss"] for r in _steps(run)] == [r["loss"] for r in _steps(whole)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_signal_under_compare_says_to_rerun_the_compare_which_continues(tmp_path, capsys,
                                                                         monkeypatch):
    from sophia_pytorch.harness.compare import runner

    out = tmp_path / "cmp"
    args = ["compare", "--optimizers", "adamw",
            *_small(tmp_path, "--max-steps", "4", "--out", str(out))]
    real = runner.train
    monkeypatch.setattr(runner, "train", lambda config, resume=None: real(
        config, resume=resume, on_step=_signal_at(2, signal.SIGTERM)))
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.splitlines()[-1]
    assert "sophia compare" in err and f"--out {out}" in err and "--resume" not in err, err
    resumed = []
    monkeypatch.setattr(runner, "train", lambda config, resume=None: resumed.append(resume)
                        or real(config, resume=resume))
    assert main(args) == 0
    assert resumed == [out / "runs" / "adamw-x1-seed0"]  # continued from its checkpoint
    assert (out / "report.md").exists()


# ----------------------------------------- design: the checkpoint check by the records' CRC-32
def test_a_flipped_byte_in_any_record_is_found_as_zipfile_finds_it(tmp_path):
    import zipfile

    import torch

    from sophia_pytorch.harness.checkpoint import save_checkpoint, verify_records

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.arange(4096.0)}, "step": 3}, path)
    assert verify_records(path) is None
    whole = path.read_bytes()
    with zipfile.ZipFile(path) as archive:  # a record's bytes follow its local header
        records = [(info.filename, info.header_offset + 30 + sum(struct.unpack(
                    "<HH", whole[info.header_offset + 26:info.header_offset + 30])),
                    info.file_size) for info in archive.infolist()]
    for name, start, size in records:
        if not size:
            continue
        damaged = bytearray(whole)
        damaged[start + size // 2] ^= 0x10
        path.write_bytes(damaged)
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() == name  # the reference: Python's own zip reader
        assert verify_records(path) == name


def test_a_checkpoint_cut_short_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "1", "--out-dir", str(run))]) == 0
    whole = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(whole[:len(whole) // 2])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "2", "--no-progress"]) == 2
    one_line_error(capsys, "checkpoint", "--resume")


def test_a_signal_after_the_last_evaluation_lets_the_run_finish(tmp_path, monkeypatch):
    from sophia_pytorch.harness import trainer

    real = trainer.Trainer.save

    def save_then_signal(self, name="checkpoint.pt"):  # the last step's final save
        real(self, name)
        if self.state.step == 3:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(trainer.Trainer, "save", save_then_signal)
    run = tmp_path / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "3", "--out-dir", str(run))]) == 0
    assert [row["step"] for row in _steps(run)] == [1, 2, 3]
    # (a signal during the last step's evaluation stops it: tests/harness/test_no_silent_faults.py)


def test_compare_with_eval_every_0_reports_finite_final_losses(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "adamw,lion",
                 *_small(tmp_path, "--max-steps", "2", "--eval-every", "0",
                         "--out", str(out))]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2 and all(run["final_val_loss"] > 0 for run in runs)
