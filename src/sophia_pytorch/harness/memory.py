"""How much memory a run needs, checked before anything is allocated; out-of-memory errors
as one-line user errors.

The estimate is a lower bound by part (model and optimizer state, one micro-batch's
activations, the step's token windows), enough to refuse a CPU run that cannot fit before it
takes the machine's memory; a GPU run that does not fit stops at its first out-of-memory
error, which :func:`memory_errors_are_user_errors` turns into the same kind of message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .config import Config
from .errors import SophiaError

__all__ = ["check_memory", "estimate_memory", "memory_errors_are_user_errors"]

# Bytes per float32 parameter held during a step: weights, gradients, two optimizer moments.
_BYTES_PER_PARAMETER = 16


def estimate_memory(config: Config, vocab_size: int) -> dict[str, int]:
    """A rough lower bound of the bytes a training step holds, by part: ``model``
    (parameters, gradients, optimizer state), ``activations`` (one micro-batch's, kept for
    backward, plus its logits) and ``batches`` (the step's token windows)."""
    shape, run = config.model, config.run
    d, layers, block, rows = shape.n_embd, shape.n_layer, shape.block_size, run.batch_size
    parameters = 12 * layers * d * d + 13 * layers * d + (vocab_size + block) * d + 2 * d
    return {"model": _BYTES_PER_PARAMETER * parameters,
            "activations": 4 * rows * block * (16 * layers * d + 3 * vocab_size),
            "batches": 8 * run.grad_accum * rows * (block + 1)}


def check_memory(config: Config, vocab_size: int, device: torch.device) -> None:
    """Refuse, before allocating, a CPU run that cannot fit in this machine's memory (a GPU
    run that does not fit stops at its first out-of-memory error instead)."""
    if device.type != "cpu":
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    parts = estimate_memory(config, vocab_size)
    if sum(parts.values()) <= total:
        return
    fixes = {"model": "use a smaller model (--n-layer, --n-embd)",
             "activations": "lower --batch-size (raise --grad-accum to keep the tokens per "
                            "step) or --block-size",
             "batches": "lower --grad-accum"}
    largest = max(parts, key=parts.__getitem__)
    raise SophiaError(
        f"this run needs at least {sum(parts.values()) / 2**30:.3g} GiB of memory (mostly "
        f"{largest}), more than the {total / 2**30:.3g} GiB here; {fixes[largest]}"
    )


@contextlib.contextmanager
def memory_errors_are_user_errors() -> Iterator[None]:
    """Turn an out-of-memory error (CPU ``MemoryError``, CUDA or allocator
    ``RuntimeError``) inside the block into a one-line SophiaError with the fix."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        if isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError) \
                and "out of memory" not in text and "can't allocate memory" not in text:
            raise
        first = text.strip().splitlines()[0][:120] if text.strip() else type(exc).__name__
        raise SophiaError(
            f"out of memory ({first}); lower --batch-size (raise --grad-accum to keep the "
            "tokens per step) or use a smaller model"
        ) from None
