"""Atomic checkpoints and the RNG states that make a resumed run bit-identical.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the old one with ``os.replace`` (atomic on POSIX and Windows), and the folder is
fsynced so the rename itself survives a power cut. A process killed at any point leaves
either the previous checkpoint or the new one, never a torn file. Checkpoints hold only
tensors and plain Python values, so they load with ``torch.load(weights_only=True)``.

Every record of the file (each tensor's bytes, the pickle) carries the CRC-32 that
``torch.save`` computes as it writes the zip; ``torch.load`` does not check it, so
:func:`load_checkpoint` does, streaming the file once before unpickling: flipped bytes inside
a tensor would otherwise load and train to garbage. A record whose zip entry says it is a
folder (a name ending in ``/``, or the MS-DOS directory attribute 0x10 in its external
attributes) is refused too: its bytes and CRC-32 are intact, but torch's zip reader then
hands back uninitialised memory for that tensor. Flipping any one bit of any record's
headers gives either that refusal or the very tensors saved
(``tests/harness/test_no_silent_faults.py`` sweeps them). The check costs the save nothing (a
separate SHA-256 over every tensor cost a full extra pass, see
``benchmarks/checkpoint_checksum.py``). Checkpoints written with that SHA-256
(``payload_sha256``) still load and are checked against it.

A training checkpoint (:data:`CHECKPOINT_FORMAT` 3) holds ``config``, ``model``,
``optimizer``, ``train_state``, ``rng`` and ``sharded``; :func:`upgrade` reads formats 1 and 2
as format 3 (``.resume`` does, once per resume).
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SophiaError
from .jsonio import atomic_file

__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "STABLE_CHECKPOINT", "TRAINING_KEYS",
           "load_checkpoint", "payload_checksum", "rng_state", "save_checkpoint",
           "set_rng_state", "train_state_of", "upgrade", "verify_records"]

# 3: no scheduler state (the lr is derived from the step); 2 and 1 still resume (upgrade).
CHECKPOINT_FORMAT = 3
CHECKPOINT = "checkpoint.pt"  # a run folder's latest checkpoint, the one a resume reads
STABLE_CHECKPOINT = "stable.pt"  # a wsd run's checkpoint at the start of its decay
TRAINING_KEYS = ("config", "model", "optimizer", "rng")  # and train_state (format 1: step)

CHECKSUM = "payload_sha256"  # checkpoints before the zip's CRC-32 was checked
RECORD_CHECK = "record_crc32"  # the marker of a checkpoint checked by its records' CRC-32
_READ_BYTES = 1 << 22
_DOS_DIRECTORY = 0x10  # MS-DOS's folder attribute, in a zip entry's external attributes


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically,
    each record with its CRC-32; temp files an earlier, killed save left are removed.

    Raises:
        OSError: the disk refused a write (with its errno, e.g. ENOSPC: ``torch.save`` turns
            it into a RuntimeError without one); the previous checkpoint is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        with atomic_file(path, sync=True) as file:
            sink = _Sink(file)
            try:
                # torch.save needs only write (and flush), as its docstring says; its stubs
                # ask for a whole IO[bytes] (torch 2.13)
                torch.save({**state, RECORD_CHECK: True}, sink)  # type: ignore[arg-type]
            except RuntimeError:
                if sink.error is not None:  # the disk's error, not torch's rewording of it
                    raise sink.error from None
                raise
    finally:
        torch.serialization.set_crc32_options(crc32)
    _fsync_folder(path.parent)


class _Sink:
    """A file for ``torch.save`` that keeps the OSError a write raised (torch reports it as
    a RuntimeError that has lost its errno)."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def verify_records(path: str | Path) -> str | None:
    """Read every record of the zip ``path`` once, checking its CRC-32; the name of the
    first record that does not match, cannot be read or is marked as a folder (torch would
    read it as empty, see the module docstring), or None when all are whole files.

    Stored (uncompressed) records, all that ``torch.save`` writes, are read straight into
    one reused buffer and fed to ``zlib.crc32``; others go through ``zipfile``.
    """
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        buffer = memoryview(bytearray(_READ_BYTES))
        with open(path, "rb", buffering=0) as file:
            for info in infos:
                if _is_folder(info):
                    return info.filename
                try:
                    if info.compress_type == zipfile.ZIP_STORED:
                        crc = _stored_crc32(file, info, buffer)
                    else:
                        with archive.open(info) as record:
                            while record.read(_READ_BYTES):
                                pass
                        crc = info.CRC
                except (zipfile.BadZipFile, OSError, struct.error):
                    return info.filename
                if crc != info.CRC:
                    return info.filename
    return None


def _is_folder(info: zipfile.ZipInfo) -> bool:
    """Whether a zip reader may take record ``info`` for a folder: its name ends in ``/``
    (all ``zipfile`` looks at) or its external attributes carry the MS-DOS directory bit
    (what torch's reader, miniz, also looks at). ``torch.save`` writes neither."""
    return info.filename.endswith("/") or bool(info.external_attr & _DOS_DIRECTORY)


def _stored_crc32(file: Any, info: zipfile.ZipInfo, buffer: memoryview) -> int | None:
    """The CRC-32 of the bytes of stored record ``info``, read from ``file``; None when its
    local header is not where the central directory says."""
    file.seek(info.header_offset)
    header = file.read(30)
    if header[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    file.seek(info.header_offset + 30 + name_length + extra_length)
    crc, remaining = 0, info.file_size
    while remaining:
        count = file.readinto(buffer[:min(remaining, len(buffer))])
        if not count:
            return None  # the file ends inside the record
        crc = zlib.crc32(buffer[:count], crc)
        remaining -= count
    return crc


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``weights_only=True``; a bad file is a SophiaError."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise SophiaError(
            f"checkpoint {str(path)!r} does not exist; pass the run folder or checkpoint.pt "
            "of an earlier run to --resume"
        )
    damaged = None
    try:
        damaged = verify_records(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # any way a file fails to unpickle: not one of ours, or torn
        if damaged is not None:  # the pickle's own record is the damaged one
            raise _damaged(path, damaged) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in first_line:  # torch's advice (weights_only=False) is not ours
            first_line = "not a tensors-only checkpoint"
        raise SophiaError(
            f"cannot read checkpoint {str(path)!r} ({first_line}); it is damaged or not a "
            "sophia checkpoint: point --resume at another one or start without --resume"
        ) from None
    if isinstance(state, dict) and state.pop(RECORD_CHECK, False) is True:
        if damaged is not None:
            raise _damaged(path, damaged)
        return state
    if isinstance(state, dict) and CHECKSUM not in state and state.get("format") == 1:
        return state  # written before checksums (sophia 0.1 runs): nothing to check against
    if not isinstance(state, dict) or CHECKSUM not in state:
        raise SophiaError(
            f"{str(path)!r} is not a sophia checkpoint (it has no checksum); point "
            "--resume at a checkpoint.pt written by `sophia train`"
        )
    if state.pop(CHECKSUM) != payload_checksum(state):
        raise SophiaError(
            f"checkpoint {str(path)!r} is damaged (its payload does not match its checksum); "
            "point --resume at another checkpoint or start without --resume"
        )
    return state


def upgrade(state: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """Training checkpoint ``state`` of any format as format 3 (a new dict; ``state`` is left
    as it was): format 1's top-level step counters gathered into ``train_state`` (its tokens
    counted at ``tokens_per_step``, which it did not save), and the scheduler state of
    formats 1 and 2 dropped with the ``initial_lr`` it left in each optimizer group (the lr is
    derived from the step now). ``state`` must hold :data:`TRAINING_KEYS`."""
    upgraded = {key: state[key] for key in TRAINING_KEYS}
    upgraded.update(format=CHECKPOINT_FORMAT, sharded=state.get("sharded"),
                    train_state=train_state_of(state, tokens_per_step))
    optimizer = upgraded["optimizer"]
    if isinstance(optimizer, dict) and "param_groups" in optimizer:
        upgraded["optimizer"] = {**optimizer, "param_groups": [
            {k: v for k, v in group.items() if k != "initial_lr"}
            for group in optimizer["param_groups"]]}
    return upgraded


def train_state_of(state: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """The TrainState (as a dict) a training checkpoint of any format holds: format 1 kept
    it in top-level keys and no token count (counted here at ``tokens_per_step``)."""
    if "train_state" in state:
        return state["train_state"]
    step = state["step"]
    return {"step": step, "tokens": step * tokens_per_step,
            "data_position": state["data_position"], "train_seconds": state["train_seconds"],
            "hessian_seconds": state.get("hessian_seconds", 0.0),
            "skipped_steps": state["skipped_steps"], "bad_in_row": state["bad_in_row"],
            "evals": state["evals"]}


def _damaged(path: Path, record: str) -> SophiaError:
    """The error for checkpoint ``path`` whose ``record`` failed :func:`verify_records`."""
    return SophiaError(
        f"checkpoint {str(path)!r} is damaged (record {record} does not match its checksum, "
        "a CRC-32, or its zip entry is marked as a folder); point --resume at another "
        "checkpoint or start without --resume"
    )


def payload_checksum(state: Any) -> str:
    """SHA-256 over every tensor's bytes, dtype and shape and every other value's repr, in
    order: the check of checkpoints written before their records' CRC-32 was checked."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {tensor.dtype} {tuple(value.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


def rng_state() -> dict[str, Any]:
    """Every RNG the loop may touch: torch CPU (and CUDA), Python ``random`` and NumPy."""
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss,
                  np_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss,
                         np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
