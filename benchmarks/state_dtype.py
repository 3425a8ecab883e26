"""Sophia's step with bfloat16 and 8-bit state against float32 state and fused AdamW.

One run prints, for each parameter set (a GPT's float32 parameters), a table of the median
wall time of ``step()`` on the fused CPU kernel with ``state_dtype=None`` (float32 m and h,
24 bytes a parameter moved: θ, g, m, h read, θ and m written) and ``state_dtype=torch.bfloat16``
(18 bytes: m and h are 2 bytes), of ``state_dtype=torch.uint8`` (8-bit codes and a float32
scale per 256: about 15 bytes) on the for-loop and foreach paths, which the fused kernel does
not take (torch ops: many passes over memory, so the byte limit is no bound for them), and
of torch's fused AdamW (28 bytes), with each row's achieved GB/s, its ratio to the
float32-state step, the state bytes a parameter and the byte limit (moved bytes / 24).

Rows are interleaved: every round times a few steps of each optimizer in an order that rotates
between rounds, so load on a shared machine falls on all rows alike; medians are reported.

    python benchmarks/state_dtype.py                     # 41M and 124M
    python benchmarks/state_dtype.py --sets 41M --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import (  # noqa: E402 - the shapes and machine description step_time.py uses
    GPT_SETS,
    LR,
    WEIGHT_DECAY,
    Row,
    git_commit,
    gpt_shapes,
    load_average,
    machine_description,
)

# m and h (AdamW: m and v) a parameter; 8-bit: a byte each and a float32 absmax per 256
STATE_BYTES = {"float32": 8.0, "bfloat16": 4.0, "uint8": 2 + 8 / 256, "adamw": 8.0}


def make_rows(params: list[torch.Tensor]) -> list[tuple[Row, float]]:
    """(row, state bytes a parameter) for Sophia with float32, bf16 and 8-bit state and fused
    AdamW, each over ``params``, warmed up, Sophia's h set by one refresh so some coordinates
    clip."""
    from sophia_pytorch import SophiaG

    rows = []
    for path, label, state_dtype, moved in (
            ("fused", "float32", None, 24), ("fused", "bfloat16", torch.bfloat16, 18),
            ("for-loop", "uint8", torch.uint8, 15), ("foreach", "uint8", torch.uint8, 15)):
        paths = dict(fused=True) if path == "fused" else dict(foreach=path == "foreach")
        optimizer = SophiaG(params, lr=LR, weight_decay=WEIGHT_DECAY, state_dtype=state_dtype,
                            **paths)
        optimizer.update_hessian(scale=480.0)
        name = "8-bit" if label == "uint8" else label
        rows.append((Row(f"SophiaG {path}, {name} state", moved, optimizer.step),
                     STATE_BYTES[label]))
    adamw = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    rows.append((Row("torch AdamW fused", 28, adamw.step), STATE_BYTES["adamw"]))
    for row, _ in rows:
        row.step()  # state creation, first touch of memory
    return rows


def benchmark_set(name: str, rounds: int, steps: int) -> None:
    """Time every row on set ``name`` and print its table."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in gpt_shapes(**GPT_SETS[name]):
        param = (torch.randn(shape, generator=generator) * 0.02).requires_grad_()
        param.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(param)
    numel = sum(p.numel() for p in params)
    rows = make_rows(params)
    load_before = load_average()
    for round_index in range(rounds):
        shift = round_index % len(rows)
        for row, _ in rows[shift:] + rows[:shift]:
            for _ in range(steps):
                start = time.perf_counter()
                row.step()
                row.times.append(time.perf_counter() - start)

    reference = statistics.median(rows[0][0].times)
    print(f"\n### GPT {name}: {len(params)} tensors, {numel / 1e6:.1f}M float32 parameters\n")
    print(f"{rounds} rounds x {steps} steps per row, interleaved; load average {load_before} "
          f"before, {load_average()} after.\n")
    print("| step | state B/param | moved B/param | ms/step median | IQR ms | GB/s at median |"
          " x float32 state (time) | byte limit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row, state_bytes in rows:
        median = statistics.median(row.times)
        low, _, high = statistics.quantiles(row.times, n=4)
        moved = row.bytes_per_coordinate * numel / 1e9
        print(f"| {row.name} | {state_bytes:.2f} | {row.bytes_per_coordinate} |"
              f" {median * 1e3:.1f} | {low * 1e3:.1f}-{high * 1e3:.1f} | {moved / median:.1f} |"
              f" {median / reference:.2f} | {row.bytes_per_coordinate / 24:.2f} |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(GPT_SETS), default=list(GPT_SETS))
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every row (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from sophia_pytorch._kernel import loader
    from sophia_pytorch.functional import fused_kernel_available

    if not fused_kernel_available():
        raise SystemExit(f"the fused kernel is unavailable: {loader.unavailable_reason()}")
    print(f"machine: {machine_description()}")
    print(f"commit: {git_commit()}")
    print(f"command: python {' '.join(sys.argv)}")
    torch.set_grad_enabled(False)
    for name in args.sets:
        benchmark_set(name, args.rounds, args.steps)


if __name__ == "__main__":
    main()
