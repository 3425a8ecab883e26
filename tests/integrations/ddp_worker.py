"""One rank of a 2-process gloo DDP run, started by ``torchrun`` from the integration tests:

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m tests.integrations.ddp_worker {transformers|lightning} FOLDER   # from the repository

Each rank trains with the integration and saves what it saw to ``FOLDER/rank{r}.pt``.

Fresh processes rather than forks of the test process: a fork of a process that has run
OpenMP-parallel kernels (as the rest of the suite does) can deadlock in its first parallel
op, and these runs were seen to hang that way in the full suite.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def transformers_rank(folder: Path) -> None:
    from tests.integrations.helpers import hessians_of
    from tests.integrations.test_transformers import _train

    trainer = _train(folder / f"out{trainer_rank()}", rows=64, max_steps=4,
                     sophia_kwargs={"refresh_every": 2})
    torch.save({
        "world": trainer.args.world_size,
        "calls": [(c.steps_taken, c.scale) for c in trainer.spy.calls],
        "local_counts": [int(f["mask"].sum()) for f in trainer.forwards],
        "labels": [f["labels"] for f in trainer.forwards],
        "hessians": hessians_of(trainer.optimizer.optimizer),
        "params": [p.detach().clone() for p in trainer.model.parameters()],
    }, folder / f"rank{trainer_rank()}.pt")


def lightning_rank(folder: Path) -> None:
    from tests.integrations.helpers import hessians_of
    from tests.integrations.test_lightning import LitLM, SpiedCallback, _fit

    module, spied = LitLM(refresh_every=2), SpiedCallback()
    trainer = _fit(module, [spied], max_steps=4, devices=2, strategy="ddp", rows=64)
    (optimizer,) = trainer.optimizers
    torch.save({
        "world": trainer.world_size,
        "calls": [(c.steps_taken, c.scale) for c in module.spy.calls],
        "local_counts": [int(f["mask"].sum()) for f in spied.forwards],
        "labels": [f["targets"] for f in spied.forwards],
        "hessians": hessians_of(optimizer),
        "params": [p.detach().clone() for p in module.parameters()],
    }, folder / f"rank{trainer.global_rank}.pt")


def trainer_rank() -> int:
    import os

    return int(os.environ["RANK"])


if __name__ == "__main__":
    torch.set_num_threads(1)
    framework, out = sys.argv[1], Path(sys.argv[2])
    {"transformers": transformers_rank, "lightning": lightning_rank}[framework](out)
    # As sophia_pytorch.harness.__main__ does under torchrun: skip the C++ static destructors,
    # whose teardown sometimes aborts a finished rank ("terminate called without an active
    # exception") and fails the job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
