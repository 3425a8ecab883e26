"""No silent wrong number from the harness: a checkpoint, a branched
resume, a lock file, a signal during evaluation, a comparison, the token cache or the
schedule. Each fault is the real one: a real zip edited bit by bit, a real symlink, a real
SIGTERM to a real ``sophia train``."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from sophia_pytorch.harness import rundir
from sophia_pytorch.harness.checkpoint import load_checkpoint, save_checkpoint
from sophia_pytorch.harness.cli import main
from sophia_pytorch.harness.data import prepare_data
from sophia_pytorch.harness.errors import SophiaError
from sophia_pytorch.harness.schedule import LRSchedule
from sophia_pytorch.harness.trainer import train
from tests.harness.helpers import corpus_slice, one_line_error, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _small(tmp_path: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus_slice(tmp_path / "data")), "--cache-dir", str(tmp_path / "c"),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--no-progress",
            "--warmup-steps", "1", *extra]


def _rows(run: Path, kind: str = "step") -> list[dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


# ------------------------------------------------------- item 8: a .lock that is a symlink
@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path, capsys,
                                                                      dangling):
    outside = tmp_path / "elsewhere" / "precious.txt"
    outside.parent.mkdir()
    if not dangling:
        outside.write_text("not yours\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(outside)
    assert main(["train", *_small(tmp_path, "--max-steps", "1", "--out-dir", str(run))]) == 2
    one_line_error(capsys, "symlink", str(outside), "--out-dir")
    if dangling:
        assert not outside.exists()  # O_CREAT through the link would have made it
    else:
        assert outside.read_text() == "not yours\n"  # before the fix: our PID
    assert (run / ".lock").is_symlink()  # refused, not removed: we did not make it
    with pytest.raises(SophiaError, match="is a symlink"):
        rundir.RunLock(run).acquire()


# ------------------------------------------- item 6: a checkpoint's zip headers, bit by bit
def _central_entries(whole: bytes) -> list[tuple[str, int]]:
    """(name, offset) of every central-directory entry of the zip ``whole``, read by
    hand (the layout of PKWARE's APPNOTE 4.3.12), not through the code under test."""
    entries, end = [], whole.rfind(b"PK\x05\x06")
    count, start = struct.unpack("<H", whole[end + 10:end + 12])[0], \
        struct.unpack("<I", whole[end + 16:end + 20])[0]
    if count == 0xFFFF or start == 0xFFFFFFFF:  # in the zip64 end record instead
        end64 = whole.rfind(b"PK\x06\x06")
        count, start = struct.unpack("<QQ", whole[end64 + 32:end64 + 40] +
                                     whole[end64 + 48:end64 + 56])
    for _ in range(count):
        assert whole[start:start + 4] == b"PK\x01\x02"
        name_length, extra_length, comment_length = struct.unpack("<HHH",
                                                                  whole[start + 28:start + 34])
        entries.append((whole[start + 46:start + 46 + name_length].decode(), start))
        start += 46 + name_length + extra_length + comment_length
    return entries


def _same(saved: object, loaded: object) -> bool:
    """Whether ``loaded`` holds the very values of ``saved``, bit for bit (NaN included)."""
    if isinstance(saved, torch.Tensor):
        return isinstance(loaded, torch.Tensor) and saved.dtype == loaded.dtype \
            and saved.shape == loaded.shape \
            and saved.view(torch.uint8).tolist() == loaded.view(torch.uint8).tolist()
    if isinstance(saved, dict):
        return isinstance(loaded, dict) and saved.keys() == loaded.keys() \
            and all(_same(saved[k], loaded[k]) for k in saved)
    return saved == loaded


def test_a_record_marked_as_a_folder_is_refused_on_resume_for_every_record(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_small(tmp_path, "--max-steps", "2", "--out-dir", str(run))]) == 0
    whole = (run / "checkpoint.pt").read_bytes()
    entries = _central_entries(whole)
    assert len(entries) > 20  # every weight and moment is a record of its own
    for name, start in entries:
        damaged = bytearray(whole)
        damaged[start + 38] |= 0x10  # external attributes, low byte: MS-DOS's folder bit
        (run / "checkpoint.pt").write_bytes(damaged)
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--max-steps", "3"]) == 2, name
        one_line_error(capsys, "is damaged", name, "--resume")


@pytest.mark.slow
def test_every_bit_of_every_record_header_is_refused_or_harmless(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(16, 8, generator=generator),
                       "b": torch.randn(8, generator=generator)}, "step": 3}
    path = tmp_path / "checkpoint.pt"  # 8 records: the pickle, 2 tensors, torch's 5 small
    save_checkpoint(state, path)
    whole = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        local = [info.header_offset for info in archive.infolist()]
    headers = [(start, 46 + len(name.encode())) for name, start in _central_entries(whole)]
    headers += [(start, 30 + struct.unpack("<H", whole[start + 26:start + 28])[0])
                for start in local]  # each header with the record's name
    wrong = []
    for start, length in headers:
        for bit in range(8 * length):
            damaged = bytearray(whole)
            damaged[start + bit // 8] ^= 1 << bit % 8
            path.write_bytes(damaged)
            try:
                loaded = load_checkpoint(path)
            except SophiaError:
                continue
            if not _same(state, loaded):
                wrong.append((start, bit))
    assert wrong == []  # before the fix: the folder bit of each tensor record


# ------------------------------------ item 12: the token cache, the BPE, wsd, an empty file
def _bpe_entry(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A BPE cache entry of the corpus slice, and its token arrays."""
    data = prepare_data(str(corpus_slice(tmp_path / "data")), tokenizer="bpe",
                        bpe_vocab_size=300, cache_dir=tmp_path / "cache")
    return data.folder, {"train": data.train.tobytes(), "val": data.val.tobytes(),
                         "tokenizer": (data.folder / "tokenizer.json").read_bytes()}


@pytest.mark.parametrize("damage", ["truncated", "empty", "another vocabulary"])
def test_a_damaged_bpe_tokenizer_in_the_cache_is_rebuilt(tmp_path, damage):
    folder, whole = _bpe_entry(tmp_path)
    path = folder / "tokenizer.json"
    if damage == "truncated":
        path.write_bytes(whole["tokenizer"][:len(whole["tokenizer"]) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # whole JSON, but not the tokenizer the tokens were written with
        other = prepare_data(str(corpus_slice(tmp_path / "data")), tokenizer="bpe",
                             bpe_vocab_size=400, cache_dir=tmp_path / "other")
        path.write_bytes((other.folder / "tokenizer.json").read_bytes())
    data = prepare_data(str(corpus_slice(tmp_path / "data")), tokenizer="bpe",
                        bpe_vocab_size=300, cache_dir=tmp_path / "cache")
    assert data.folder == folder and data.vocab_size == 300
    assert {"train": data.train.tobytes(), "val": data.val.tobytes(),
            "tokenizer": path.read_bytes()} == whole


def test_a_truncated_bpe_tokenizer_does_not_stop_a_run(tmp_path, capsys):
    folder, whole = _bpe_entry(tmp_path)
    (folder / "tokenizer.json").write_bytes(whole["tokenizer"][:100])
    args = _small(tmp_path, "--max-steps", "1", "--out-dir", str(tmp_path / "run"),
                  "--tokenizer", "bpe", "--bpe-vocab-size", "300")
    args[args.index("--cache-dir") + 1] = str(tmp_path / "cache")
    assert main(["train", *args]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("size", [1, 256])
def test_a_bpe_vocabulary_without_room_for_a_merge_is_refused(tmp_path, capsys, size):
    args = _small(tmp_path, "--max-steps", "1", "--out-dir", str(tmp_path / "run"),
                  "--tokenizer", "bpe", "--bpe-vocab-size", str(size))
    assert main(["train", *args]) == 2
    one_line_error(capsys, f"--bpe-vocab-size {size}", "--bpe-vocab-size 257")
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_the_smallest_bpe_vocabulary_allowed_adds_a_merge(tmp_path):
    data = prepare_data(str(corpus_slice(tmp_path / "data")), tokenizer="bpe",
                        bpe_vocab_size=257, cache_dir=tmp_path / "cache")
    assert data.vocab_size == 257 and int(data.train.max()) == 256  # the merge is used


def _decayed_steps(max_steps: int, decay_fraction: float, warmup_steps: int) -> int:
    """Steps trained below the peak lr after the warmup: the lr of each step, taken from
    the definition (peak until the decay, then a line to min_lr at max_steps)."""
    schedule = LRSchedule("wsd", 0.1, warmup_steps, max_steps, decay_fraction)
    return sum(schedule.lr(step, 1.0) < 1.0 for step in range(warmup_steps, max_steps))


@pytest.mark.parametrize(("max_steps", "fraction", "warmup", "fix"), [
    (10, 0.1, 1, "--decay-fraction 0.2 or more"),
    (7, 0.05, 0, "--decay-fraction 0.286 or more"),
    (10, 0.5, 9, "--warmup-steps 8 or less"),
    (1, 1.0, 0, "--max-steps 2 or more"),
])
def test_a_wsd_decay_without_a_decayed_step_is_refused_naming_the_fix(
        tmp_path, capsys, max_steps, fraction, warmup, fix):
    assert _decayed_steps(max_steps, fraction, warmup) == 0
    args = _small(tmp_path, "--max-steps", str(max_steps), "--out-dir", str(tmp_path / "run"),
                  "--schedule", "wsd", "--decay-fraction", str(fraction))
    args[args.index("--warmup-steps") + 1] = str(warmup)
    assert main(["train", *args]) == 2
    one_line_error(capsys, "no step trains at a decayed lr", fix)
    assert not (tmp_path / "run").exists()
    if "--max-steps" not in fix:  # the fix it names gives a decayed step
        flag, value = fix.split()[:2]
        settings = (max_steps, float(value), warmup) if flag == "--decay-fraction" \
            else (max_steps, fraction, int(value))
        assert _decayed_steps(*settings) >= 1
        LRSchedule("wsd", 0.1, settings[2], settings[0], settings[1]).check()


@pytest.mark.parametrize("folder", [False, True])
def test_an_empty_data_file_is_named_as_empty(tmp_path, capsys, folder):
    empty = tmp_path / "corpus" / "empty.txt"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    source = empty.parent if folder else empty
    args = _small(tmp_path, "--max-steps", "1", "--out-dir", str(tmp_path / "run"))
    args[args.index("--data") + 1] = str(source)
    assert main(["train", *args]) == 2
    err = one_line_error(capsys, str(source), "is empty", "--data")
    assert "2 tokens" not in err


# ------------------------------------- item 11: compare checks every run before training any
def _compare(tmp_path: Path, out: Path, optimizers: str, max_steps: int, *extra: str) -> int:
    return main(["compare", "--optimizers", optimizers, "--out", str(out),
                 *_small(tmp_path, "--max-steps", str(max_steps), "--eval-every", "0"), *extra])


def _run_folders(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "runs").iterdir()) if (out / "runs").exists() else []


def test_a_mistaken_compare_is_refused_before_any_run_trains(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(tmp_path, out, "adamw", 2) == 0
    before = _run_folders(out)
    capsys.readouterr()
    # lion is new (nothing to refuse there), adamw's folder holds the 2-step run
    assert _compare(tmp_path, out, "lion,adamw", 3) == 2
    one_line_error(capsys, "adamw-x1-seed0", "max_steps 2 (now 3)", "--overwrite")
    assert _run_folders(out) == before  # before the fix: lion trained 3 steps first
    # ... so the corrected command is not blocked by a stray 3-step lion run
    assert _compare(tmp_path, out, "lion,adamw", 2) == 0, capsys.readouterr().err
    assert _run_folders(out) == ["adamw-x1-seed0", "lion-x1-seed0"]


def test_a_later_seeds_folder_with_other_settings_is_refused_before_training(tmp_path,
                                                                           capsys):
    out = tmp_path / "cmp"
    assert _compare(tmp_path, out, "adamw", 2, "--seed", "1") == 0
    before = _run_folders(out)
    assert before == ["adamw-x1-seed1"]
    capsys.readouterr()
    # seed 0 is new and would train before seed 1's folder (a 2-step run) is reached
    assert _compare(tmp_path, out, "adamw", 3, "--seeds", "2") == 2
    one_line_error(capsys, "adamw-x1-seed1", "max_steps 2 (now 3)")
    assert _run_folders(out) == before


# ------------------------------------------- item 10: SIGTERM inside a (long) evaluation
def _sophia(*args: str) -> subprocess.Popen:
    """``sophia train ...`` in a process of its own, importing this checkout."""
    return subprocess.Popen(
        [sys.executable, "-m", "sophia_pytorch.harness", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])})


def _wait_for(condition, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.01)


def _saved_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["train_state"]


def _has_step_row(run: Path, step: int) -> bool:
    try:
        return any(json.loads(line).get("step") == step and b'"kind": "step"' in line
                   for line in (run / "log.jsonl").read_bytes().splitlines())
    except (FileNotFoundError, ValueError):
        return False


@pytest.mark.slow
def test_sigterm_stops_an_evaluation_that_would_never_end(tmp_path):
    run = tmp_path / "run"  # 10 million batches: some 20 minutes of evaluation at step 0
    process = _sophia("train", *_small(tmp_path, "--max-steps", "4", "--eval-batches",
                                       "10000000", "--threads", "1", "--out-dir", str(run)))
    try:
        _wait_for(lambda: (run / "config.json").exists(), process)  # written just before fit
        time.sleep(1.0)  # inside the evaluation at step 0
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM  # before the fix: 20 min
    finally:
        process.kill()
        process.wait()
    assert time.monotonic() - signalled < 60
    stderr = process.stderr.read()
    assert "Traceback" not in stderr and "SIGTERM at step 0 (saved" in stderr, stderr
    assert f"sophia train --resume {run}" in stderr
    saved = _saved_state(run / "checkpoint.pt")
    assert saved["step"] == 0 and saved["eval_due"] and saved["evals"] == []
    assert _rows(run, "eval") == []  # no row for an evaluation that did not finish


@pytest.mark.slow
def test_sigterm_inside_an_evaluation_saves_and_resume_equals_the_whole_run(tmp_path):
    settings = _small(tmp_path, "--max-steps", "6", "--eval-every", "3", "--eval-batches",
                      "3000", "--threads", "1")  # seconds an evaluation
    whole = _sophia("train", *settings, "--out-dir", str(tmp_path / "whole"))
    assert whole.wait(timeout=600) == 0, whole.stderr.read()

    run = tmp_path / "run"
    process = _sophia("train", *settings, "--out-dir", str(run))
    try:
        _wait_for(lambda: _has_step_row(run, 3), process)  # step 3's evaluation starts now
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()
    stderr = process.stderr.read()
    assert "SIGTERM at step 3 (saved, its evaluation stopped" in stderr, stderr
    assert [row["step"] for row in _rows(run, "eval")] == [0]  # step 3's: not finished
    assert _saved_state(run / "checkpoint.pt")["eval_due"]

    resumed = _sophia("train", "--resume", str(run), "--no-progress")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    for kind, keys in (("step", ("step", "loss", "lr", "grad_norm")),
                       ("eval", ("step", "val_loss", "tokens"))):
        ours = [[row[k] for k in keys] for row in _rows(run, kind)]
        assert ours == [[row[k] for k in keys] for row in _rows(tmp_path / "whole", kind)]
    ours, theirs = (_saved_state(folder / "checkpoint.pt") for folder in (run, tmp_path / "whole"))
    assert [(r["step"], r["val_loss"]) for r in ours["evals"]] == \
        [(r["step"], r["val_loss"]) for r in theirs["evals"]]
    assert not ours["eval_due"]


def test_a_signal_during_the_last_evaluation_stops_it_and_resume_finishes_it(
        tmp_path, monkeypatch, capsys):
    from sophia_pytorch.harness import trainer

    whole = tmp_path / "whole"
    assert main(["train", *_small(tmp_path, "--max-steps", "3", "--out-dir", str(whole))]) == 0
    run = tmp_path / "run"
    real = trainer.Trainer.__init__

    def on_step(record: dict) -> None:
        if record["step"] == 3:  # the last: its evaluation comes next
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(trainer.Trainer, "__init__", lambda self, config, **kwargs: real(
        self, config, **{**kwargs, "on_step": on_step}))
    assert main(["train", *_small(tmp_path, "--max-steps", "3", "--out-dir", str(run))]) == \
        128 + signal.SIGTERM
    monkeypatch.setattr(trainer.Trainer, "__init__", real)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    for kind in ("step", "eval"):
        assert [(row["step"], row.get("loss"), row.get("val_loss")) for row in _rows(run, kind)] \
            == [(row["step"], row.get("loss"), row.get("val_loss")) for row in _rows(whole, kind)]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # nothing owed now
    assert [row["step"] for row in _rows(run, "eval")] == [0, 2, 3]


# ----------------------------------------------------- item 7: a branched resume, then a crash
def _crash_at(step: int):
    def on_step(record: dict) -> None:
        if record["step"] == step:
            raise KeyboardInterrupt  # killed: no checkpoint, no message

    return on_step


def _aside(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("set-aside-"))


def test_a_branched_resume_then_a_crash_then_a_folder_resume_is_the_branch_alone(tmp_path,
                                                                                 capsys):
    settings = dict(schedule="wsd", decay_fraction=0.25, warmup_steps=1, eval_every=10)
    run = tmp_path / "run"
    train(tiny_config(tmp_path, max_steps=40, **settings))  # stable.pt at step 30
    stable = run / "stable.pt"
    assert _saved_state(stable)["step"] == 30
    first = {name: (run / name).read_bytes() for name in ("log.jsonl", "checkpoint.pt")}
    reference = train(tiny_config(tmp_path, max_steps=60, out_dir=str(tmp_path / "ref"),
                                  **settings), resume=stable)  # the branch, never crashed

    with pytest.raises(KeyboardInterrupt):  # the branch, in the same folder, crashes at 35
        train(tiny_config(tmp_path, max_steps=60, **settings), resume=stable,
              on_step=_crash_at(35))
    assert "set aside" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--max-steps", "60", "--no-progress"]) == 0

    keys = ("step", "loss", "lr")
    ours = [[row[k] for k in keys] for row in _rows(run)]
    assert [row[0] for row in ours] == list(range(1, 61))  # before the fix: 31-35, then 41-60
    first_rows = [json.loads(line) for line in first["log.jsonl"].splitlines()]
    assert ours[:30] == [[row[k] for k in keys] for row in first_rows
                         if row["kind"] == "step" and row["step"] <= 30]
    assert ours[30:] == [[row[k] for k in keys] for row in _rows(reference.run_dir)]
    assert [row["step"] for row in _rows(run, "eval")] == [0, 10, 20, 30, 40, 50, 60]
    # the first branch's steps 31-40 and its checkpoint are kept, set aside
    aside, = _aside(run)
    assert (aside / "log.jsonl").read_bytes() == first["log.jsonl"]
    assert (aside / "checkpoint.pt").read_bytes() == first["checkpoint.pt"]


def test_resuming_the_folders_own_checkpoint_sets_nothing_aside(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, max_steps=8, checkpoint_every=4), on_step=_crash_at(6))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert [row["step"] for row in _rows(run)] == list(range(1, 9))
    assert _aside(run) == []


def test_resuming_the_folder_past_its_stable_checkpoint_is_no_branch(tmp_path, capsys):
    settings = dict(schedule="wsd", decay_fraction=0.25, checkpoint_every=4)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # checkpoint.pt at step 4, stable.pt at step 6
        train(tiny_config(tmp_path, max_steps=8, **settings), on_step=_crash_at(7))
    assert (_saved_state(run / "checkpoint.pt")["step"], _saved_state(run / "stable.pt")["step"]) \
        == (4, 6)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "set aside" not in capsys.readouterr().err
    assert [row["step"] for row in _rows(run)] == list(range(1, 9))
    assert _aside(run) == [] and _saved_state(run / "stable.pt")["step"] == 6
