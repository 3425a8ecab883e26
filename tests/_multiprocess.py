"""Run a function on N local processes joined by a gloo process group, for the tests.

Processes are forked where the platform allows (torch is already imported: ~1 s a launch on a
busy 2-core machine, against ~15 s for a fresh interpreter), else spawned. Each process saves
what the function returns; the caller gets the list, rank by rank.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _entry(
    rank: int, fn: Callable, world_size: int, folder: str, init: bool, args: tuple, env: dict
) -> None:
    torch.set_num_threads(1)
    os.environ.update({k: v.format(rank=rank) for k, v in env.items()})
    if init:
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=60),
        )
    try:
        result = fn(rank, world_size, *args)
    finally:
        if init and dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, Path(folder) / f"result{rank}.pt")


def run_on_ranks(
    fn: Callable[..., Any],
    folder: Path,
    *args: Any,
    world_size: int = 2,
    init: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process.

    With ``init`` the process group (gloo, a file store in ``folder``) is set up before ``fn``
    and torn down after. ``env`` values are formatted with ``rank`` and set in each process.
    """
    folder.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(
        _entry, args=(fn, world_size, str(folder), init, args, env or {}),
        nprocs=world_size, join=False, start_method=_START_METHOD,
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [folder / f"result{rank}.pt" for rank in range(world_size)]
    return [torch.load(path, weights_only=False) for path in results]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
