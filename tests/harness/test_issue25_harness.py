"""Issue 25, the harness items: no silent wrong number from a checkpoint, a branched
resume, a lock file, a signal during evaluation, a comparison, the token cache or the
schedule. Each fault is the real one: a real zip edited bit by bit, a real symlink, a real
SIGTERM to a real ``sophia train``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sophia_pytorch.harness import rundir
from sophia_pytorch.harness.cli import main
from sophia_pytorch.harness.errors import SophiaError
from tests.harness.helpers import corpus_slice

ROOT = Path(__file__).resolve().parents[2]


def _small(tmp_path: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus_slice(tmp_path / "data")), "--cache-dir", str(tmp_path / "c"),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--no-progress",
            "--warmup-steps", "1", *extra]


def _one_line_error(capsys, *fragments: str) -> str:
    """The one ``error:`` line on stderr (``note:`` lines are information)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("note: "))
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


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
    _one_line_error(capsys, "symlink", str(outside), "--out-dir")
    if dangling:
        assert not outside.exists()  # O_CREAT through the link would have made it
    else:
        assert outside.read_text() == "not yours\n"  # before the fix: our PID
    assert (run / ".lock").is_symlink()  # refused, not removed: we did not make it
    with pytest.raises(SophiaError, match="is a symlink"):
        rundir.RunLock(run).acquire()
