"""What checking a checkpoint costs, against the save and the load themselves.

For GPT-2 small (124M parameters) and large (774M), a state dict of float32 weights of the
model's shapes is saved and loaded four ways, and the checks are timed beside them:

- ``save``: ``torch.save`` to a file, flushed and fsynced, with torch's per-record CRC-32
  off (the bare cost of writing);
- ``save+crc``: ``save_checkpoint`` as the harness does it now (torch.save computes each
  record's CRC-32 as it writes; that is the whole check at save time);
- ``sha256``: the SHA-256 over every tensor's bytes (``payload_checksum``) that checkpoints
  carried before, a separate pass over the weights at every save and load;
- ``load`` / ``verify``: ``torch.load`` of the file, and ``verify_records`` reading it once
  to check every record's CRC-32 (what ``load_checkpoint`` adds to a load).

Ratios are to ``save`` (and, for the load-time checks, also to ``load``), taken in the same
run. One copy of the weights per size (a checkpoint also holds the optimizer's moments, two
more copies: every figure scales alike).

Run: ``python benchmarks/checkpoint_checksum.py [--sizes 124M,774M] [--folder /tmp]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from sophia_pytorch.harness.checkpoint import payload_checksum, save_checkpoint, verify_records

SHAPES = {"124M": (12, 768), "774M": (36, 1280), "10M": (4, 256)}  # n_layer, n_embd
VOCAB, BLOCK = 50257, 1024


def gpt2_weights(n_layer: int, n_embd: int) -> dict[str, torch.Tensor]:
    """float32 tensors of GPT-2's shapes (tied head), filled with random values."""
    shapes = {"wte": (VOCAB, n_embd), "wpe": (BLOCK, n_embd), "ln_f": (n_embd,)}
    for layer in range(n_layer):
        shapes.update({f"h{layer}.attn": (3 * n_embd, n_embd), f"h{layer}.proj": (n_embd, n_embd),
                       f"h{layer}.fc": (4 * n_embd, n_embd), f"h{layer}.fc2": (n_embd, 4 * n_embd),
                       f"h{layer}.ln1": (n_embd,), f"h{layer}.ln2": (n_embd,)})
    generator = torch.Generator().manual_seed(0)
    return {name: torch.rand(shape, generator=generator) for name, shape in shapes.items()}


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _bare_save(state: dict, path: Path) -> None:
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with path.open("wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
    finally:
        torch.serialization.set_crc32_options(crc32)


def measure(size: str, folder: Path) -> dict[str, float]:
    state = {"model": gpt2_weights(*SHAPES[size])}
    parameters = sum(t.numel() for t in state["model"].values())
    with tempfile.TemporaryDirectory(dir=folder) as temp:
        bare, checked = Path(temp) / "bare.pt", Path(temp) / "checkpoint.pt"
        times = {"parameters": parameters / 1e6, "GB": parameters * 4 / 1e9,
                 "save": _timed(lambda: _bare_save(state, bare))}
        bare.unlink()
        times["save+crc"] = _timed(lambda: save_checkpoint(state, checked))
        times["sha256"] = _timed(lambda: payload_checksum(state))
        state.clear()  # free the weights before loading a copy
        times["load"] = _timed(lambda: torch.load(checked, weights_only=True))
        times["verify"] = _timed(lambda: verify_records(checked))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="124M,774M", help=f"from {', '.join(SHAPES)}")
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="where files go")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}")
    print("| size | params (M) | GB | save s | save+crc s | sha256 s | load s | verify s "
          "| crc at save / save | sha256 / save | verify / save | verify / load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        t = measure(size, Path(args.folder))
        print(f"| {size} | {t['parameters']:.0f} | {t['GB']:.2f} | {t['save']:.2f} | "
              f"{t['save+crc']:.2f} | {t['sha256']:.2f} | {t['load']:.2f} | {t['verify']:.2f} | "
              f"{(t['save+crc'] - t['save']) / t['save']:+.1%} | {t['sha256'] / t['save']:.1%} | "
              f"{t['verify'] / t['save']:.1%} | {t['verify'] / t['load']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
