"""Sophia's update on FSDP2 (DTensor) parameters: through DTensor dispatch, or on local shards.

    python benchmarks/dtensor_step.py [--layers 30] [--width 64] [--repeats 30]

Two gloo processes on CPU shard an MLP with ``fully_shard``, give every parameter a gradient,
and time ``sophia_update`` (the for-loop and the foreach path) on (a) the DTensors themselves,
where every elementwise op pays DTensor's sharding propagation, and (b) their local shards,
as ``SophiaG.step`` does. It also reports how much rank 0's resident memory grew over the
DTensor runs (caches of sharding propagation). Ratios are taken within one run, on rank 0.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

from sophia_pytorch.functional import sophia_update


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _time(tensors: list[list[torch.Tensor]], foreach: bool, repeats: int) -> float:
    def update() -> None:
        sophia_update(
            *tensors, lr=1e-4, beta1=0.965, rho=0.04, weight_decay=0.1, eps=1e-15,
            foreach=foreach,
        )

    for _ in range(3):
        update()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        update()
    return (time.perf_counter() - start) / repeats * 1e3


@torch.no_grad()
def _run(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]
    model = torch.nn.Sequential(*layers)
    fully_shard(model)
    params = list(model.parameters())
    for param in params:
        param.grad = torch.randn_like(param)
    dtensors = [
        params,
        [p.grad for p in params],
        [torch.zeros_like(p) for p in params],
        [torch.ones_like(p) for p in params],
    ]
    shards = [[t.to_local() for t in tensors] for tensors in dtensors]
    rows = []
    for foreach in (False, True):
        before = _resident_mib()
        on_dtensors = _time(dtensors, foreach, args.repeats)
        grew = _resident_mib() - before
        on_shards = _time(shards, foreach, args.repeats)
        rows.append((foreach, on_dtensors, on_shards, grew))
    if rank == 0:
        print(f"{len(params)} parameters, {sum(p.numel() for p in params)} elements, 2 ranks")
        print(f"{'path':<9} {'DTensor ms':>11} {'local ms':>9} {'ratio':>6} {'RSS+ MiB':>9}")
        for foreach, on_dtensors, on_shards, grew in rows:
            path = "foreach" if foreach else "for-loop"
            print(f"{path:<9} {on_dtensors:>11.2f} {on_shards:>9.2f} "
                  f"{on_dtensors / on_shards:>6.1f} {grew:>9.1f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--port", type=int, default=29531)
    args = parser.parse_args()
    mp.spawn(_run, args=(args, args.port), nprocs=2)


if __name__ == "__main__":
    main()
