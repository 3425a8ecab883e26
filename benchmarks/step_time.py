"""Optimizer step time on CPU: our SophiaG paths against AdamW, the official SophiaG, SophiaH, Lion.

One run prints, for each parameter set, a table of the median wall time of ``step()`` (gradients
fixed, so only the step is timed), the effective bandwidth (the bytes each update must move at
least, over the time: 24 B per float32 coordinate for Sophia, 28 for AdamW, 20 for Lion) and
the ratio to torch's fused AdamW measured in the same run, plus a copy-bandwidth reference.

Measurements are interleaved: every round runs a few steps of each optimizer, in an order that
rotates between rounds, so that a change in machine load is shared by all rows.

    python benchmarks/step_time.py                      # GPT 12x384 (41M) and GPT-2 small (124M)
    python benchmarks/step_time.py --sets 41M --rounds 3
    python benchmarks/step_time.py --rebuild            # time a from-scratch kernel build first
    python benchmarks/step_time.py --compile            # add torch.compile of the foreach path
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Parameter shapes of a GPT with tied embeddings (nanoGPT's layout, biases included).
GPT_SETS = {
    "41M": dict(vocab=50257, context=1024, width=384, layers=12),
    "124M": dict(vocab=50257, context=1024, width=768, layers=12),
}
LR, WEIGHT_DECAY = 1e-4, 0.1


def gpt_shapes(vocab: int, context: int, width: int, layers: int) -> list[tuple[int, ...]]:
    block = [
        (width,), (width,),                       # ln_1
        (3 * width, width), (3 * width,),         # attention qkv
        (width, width), (width,),                 # attention out
        (width,), (width,),                       # ln_2
        (4 * width, width), (4 * width,),         # mlp in
        (width, 4 * width), (width,),             # mlp out
    ]
    return [(vocab, width), (context, width), *block * layers, (width,), (width,)]


@dataclass
class Row:
    name: str
    bytes_per_coordinate: int
    step: Callable[[], object]
    times: list[float] = field(default_factory=list)


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def make_rows(params: list[torch.Tensor], args: argparse.Namespace) -> list[Row]:
    """Every optimizer under test, each warmed up by one step, over the same parameters."""
    from lion_pytorch import Lion
    from pytorch_optimizer import SophiaH
    from sophia_opt import SophiaG as OfficialSophiaG

    import sophia_pytorch._kernel.loader
    from sophia_pytorch import SophiaG
    from sophia_pytorch.functional import _multi_tensor_sophia, fused_kernel_available

    rows = []

    # Our three paths share one state: they compute bitwise-equal (fused, for-loop) or
    # near-equal (foreach) updates, and sharing halves the memory of the run.
    ours = {}
    if fused_kernel_available():
        ours["SophiaG fused (ours, default)"] = SophiaG(params, lr=LR, fused=True)
    else:
        print(f"fused kernel unavailable: {sophia_pytorch._kernel.loader.unavailable_reason()}")
    ours["SophiaG foreach (ours)"] = SophiaG(params, lr=LR, foreach=True, fused=False)
    if not args.skip_for_loop:
        ours["SophiaG for-loop (ours)"] = SophiaG(params, lr=LR, foreach=False, fused=False)
    first = next(iter(ours.values()))
    first.update_hessian(scale=480.0)  # h > 0 with a spread: some coordinates clip, some not
    for name, optimizer in ours.items():
        optimizer.state = first.state
        rows.append(Row(name, 24, optimizer.step))

    if args.compile:
        rows.append(compiled_foreach_row(first, _multi_tensor_sophia))

    adamw_fused = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    adamw_foreach = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
    adamw_foreach.state = adamw_fused.state
    rows.append(Row("torch AdamW fused", 28, adamw_fused.step))
    rows.append(Row("torch AdamW foreach", 28, adamw_foreach.step))

    official = OfficialSophiaG(params, lr=LR, weight_decay=WEIGHT_DECAY)
    official.step(bs=480)  # creates its state; then a refresh makes h non-zero
    official.update_hessian()
    rows.append(Row("official SophiaG (sophia-opt)", 24, lambda: official.step(bs=480)))

    sophia_h = SophiaH(params, lr=LR, weight_decay=WEIGHT_DECAY, update_period=10**9)
    sophia_h.step(hessian=[p.grad.square() for p in params])  # the only Hessian refresh
    rows.append(Row("pytorch_optimizer SophiaH", 24, sophia_h.step))

    lion = Lion(params, lr=LR, weight_decay=WEIGHT_DECAY)
    rows.append(Row("Lion (lion-pytorch)", 20, lion.step))

    for row in rows:
        row.step()  # warm-up: state creation, first-touch of memory, any lazy compilation
    return rows


def compiled_foreach_row(optimizer, multi_tensor_sophia) -> Row:
    """torch.compile of the foreach function over the parameter list (Inductor fuses it)."""
    group = optimizer.param_groups[0]
    params = [p for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    exp_avgs = [optimizer.state[p]["exp_avg"] for p in params]
    hessians = [optimizer.state[p]["hessian"] for p in params]
    compiled = torch.compile(multi_tensor_sophia, fullgraph=True)
    kwargs = dict(lr=LR, beta1=group["betas"][0], rho=group["rho"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    start = time.perf_counter()
    compiled(params, grads, exp_avgs, hessians, **kwargs)
    print(f"torch.compile of the foreach step: first call {time.perf_counter() - start:.1f} s")
    return Row("SophiaG torch.compile(foreach)", 24,
               lambda: compiled(params, grads, exp_avgs, hessians, **kwargs))


def copy_reference(numel: int, repeats: int) -> float:
    """GB/s of ``dst.copy_(src)`` over ``numel`` float32s, counting one read and one write."""
    src, dst = torch.randn(numel), torch.empty(numel)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 8 * numel / statistics.median(times) / 1e9


def benchmark_set(name: str, args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in gpt_shapes(**GPT_SETS[name]):
        param = (torch.randn(shape, generator=generator) * 0.02).requires_grad_()
        param.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(param)
    numel = sum(p.numel() for p in params)

    rows = make_rows(params, args)
    copy_gbps = []
    load_before = load_average()
    for round_index in range(args.rounds):
        shift = round_index % len(rows)
        for row in rows[shift:] + rows[:shift]:
            for _ in range(args.steps):
                start = time.perf_counter()
                row.step()
                row.times.append(time.perf_counter() - start)
        copy_gbps.append(copy_reference(numel, 5))

    adamw_fused = next(r for r in rows if r.name == "torch AdamW fused").times
    reference, reference_min = statistics.median(adamw_fused), min(adamw_fused)
    print(f"\n### GPT {name}: {len(params)} tensors, {numel / 1e6:.1f}M float32 parameters\n")
    print(f"{args.rounds} rounds x {args.steps} steps per optimizer, interleaved; "
          f"load average {load_before} before, {load_average()} after.")
    print(f"Copy reference (dst.copy_(src), read + write): {statistics.median(copy_gbps):.1f} GB/s"
          f" (min {min(copy_gbps):.1f}, max {max(copy_gbps):.1f} over rounds). The min column"
          " is the least-disturbed step: on a shared machine it is the better estimate of the"
          " quiet-machine time.\n")
    print("| optimizer | ms/step median | IQR ms | min ms | GB/s at median | GB/s at min |"
          " x fused AdamW (median) | x fused AdamW (min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        quartiles = statistics.quantiles(row.times, n=4) if len(row.times) > 1 else [0, 0, 0]
        median, fastest = statistics.median(row.times), min(row.times)
        moved = row.bytes_per_coordinate * numel / 1e9
        print(f"| {row.name} | {median * 1e3:.1f} | {quartiles[0] * 1e3:.1f}-"
              f"{quartiles[2] * 1e3:.1f} | {fastest * 1e3:.1f} | {moved / median:.1f} |"
              f" {moved / fastest:.1f} | {median / reference:.2f} |"
              f" {fastest / reference_min:.2f} |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(GPT_SETS), default=list(GPT_SETS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (default 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every optimizer (default: torch's)")
    parser.add_argument("--rebuild", action="store_true",
                        help="build the fused kernel from scratch in a temporary directory")
    parser.add_argument("--compile", action="store_true",
                        help="add a row for torch.compile of the foreach path (slow to compile)")
    parser.add_argument("--skip-for-loop", action="store_true",
                        help="leave out our for-loop path (the slowest row)")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.rebuild:
        os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="sophia_ext_")
    import sophia_pytorch._kernel.loader
    from sophia_pytorch.functional import fused_kernel_available

    fused_kernel_available()
    info = sophia_pytorch._kernel.loader.build_info()
    print(f"machine: {machine_description()}")
    print(f"commit: {git_commit()}")
    print(f"command: python {' '.join(sys.argv)}")
    if info is None:
        print(f"fused kernel: unavailable ({sophia_pytorch._kernel.loader.unavailable_reason()})")
    else:
        how = "loaded from cache" if info.cached else "compiled from scratch"
        print(f"fused kernel: {how} in {info.seconds:.1f} s ({info.directory})")
    torch.set_grad_enabled(False)
    for name in args.sets:
        benchmark_set(name, args)


if __name__ == "__main__":
    main()
