"""Shared helpers of the harness tests: a small corpus slice and a very small run config."""

from __future__ import annotations

from pathlib import Path

from sophia_pytorch.harness.config import Config, make_config
from sophia_pytorch.harness.data import iter_documents

SLICE_CHARS = 120_000


def corpus_slice(folder: Path) -> Path:
    """The first SLICE_CHARS characters of the Shakespeare corpus, as a text file."""
    path = folder / "slice.txt"
    if not path.exists():
        text = ""
        for document in iter_documents("shakespeare"):
            text += document
            if len(text) >= SLICE_CHARS:
                break
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(text[:SLICE_CHARS], encoding="utf-8")
    return path


def tiny_config(folder: Path, **overrides) -> Config:
    """A run of a 1-layer, 32-wide GPT on the corpus slice: well under a second a step."""
    values = dict(
        n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, max_steps=6,
        warmup_steps=2, eval_every=3, eval_batches=2, refresh_every=2,
        data=str(corpus_slice(folder / "data")), cache_dir=str(folder / "cache"),
        out_dir=str(folder / "run"), progress=False,
    )
    values.update(overrides)
    return make_config(values.pop("preset", "tiny"), values)


def one_line_error(capsys, *fragments: str) -> str:
    """The one ``error:`` line on stderr, holding every fragment (``note:`` lines before it,
    e.g. what a resume does to the lr, are information, not part of the error)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("note: "))
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err
