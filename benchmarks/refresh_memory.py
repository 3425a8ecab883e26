"""Peak memory of a training step with and without the Sophia-G Hessian refresh (CPU).

Issue target: the peak of a step that refreshes the Hessian must not exceed the peak of a
step that does not. The refresh runs after the training step's graph is freed (``step()``
then ``zero_grad``), on a sub-batch, so only one graph is alive at a time.

How memory is measured: the CPU has no ``max_memory_allocated``, so a TorchDispatchMode
reads glibc's ``mallinfo2`` (bytes in use, heap plus mmapped blocks) after every aten
operation and keeps the maximum. That is the live-tensor high-water mark at operation
granularity, the same for every variant, taken in one process side by side.

    python benchmarks/refresh_memory.py            # GPT of 6 layers x 256, batch 16 x 128
"""

from __future__ import annotations

import argparse
import ctypes
import platform

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import sophia_pytorch
from sophia_pytorch.harness.model import GPT, GPTConfig


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
        "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def bytes_in_use() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakBytes(TorchDispatchMode):
    """Highest ``bytes_in_use()`` seen after any aten op inside the context, minus the start."""

    def __enter__(self) -> PeakBytes:
        self.start = bytes_in_use()
        self.peak = self.start
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, bytes_in_use())
        return out

    @property
    def peak_above_start(self) -> int:
        return self.peak - self.start


def train_step(model, optimizer, inputs, targets) -> None:
    logits = model(inputs)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def refresh(model, optimizer, inputs, fraction: float) -> None:
    rows = max(1, round(fraction * inputs.shape[0]))
    loss, num_samples = sophia_pytorch.sampled_cross_entropy(model(inputs[:rows]))
    loss.backward()
    optimizer.update_hessian(scale=num_samples)
    optimizer.zero_grad(set_to_none=True)


def refresh_inside_step(model, optimizer, inputs, targets) -> None:
    """What to avoid, measured as a check that the meter sees a second graph: the refresh
    runs while the training step's graph is still alive."""
    logits = model(inputs)
    refresh(model, optimizer, inputs, 1.0)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, block_size=args.context, n_layer=args.layers,
                       n_head=max(1, args.width // 64), n_embd=args.width)
    model = GPT(config)
    optimizer = sophia_pytorch.SophiaG(model.parameters(), lr=1e-4)
    inputs = torch.randint(0, 256, (args.batch, args.context))
    targets = torch.randint(0, 256, (args.batch, args.context))
    train_step(model, optimizer, inputs, targets)  # state exists before measuring
    refresh(model, optimizer, inputs, 1.0)

    variants = [("step, no refresh", None), ("step + refresh, fraction 1", 1.0),
                ("step + refresh, fraction 1/2", 0.5), ("step + refresh, fraction 1/4", 0.25)]
    peaks = {}
    for name, fraction in variants:
        with PeakBytes() as meter:
            train_step(model, optimizer, inputs, targets)
            if fraction is not None:
                refresh(model, optimizer, inputs, fraction)
        peaks[name] = meter.peak_above_start
    with PeakBytes() as meter:
        refresh_inside_step(model, optimizer, inputs, targets)
    peaks["(check) refresh inside the step"] = meter.peak_above_start

    baseline = peaks["step, no refresh"]
    params = sum(p.numel() for p in model.parameters())
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; GPT {args.layers}x{args.width}, "
          f"{params / 1e6:.1f}M params, batch {args.batch}x{args.context}")
    print(f"| {'variant':32} | {'peak MiB':>9} | {'ratio to no refresh':>19} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 21}|")
    for name, peak in peaks.items():
        print(f"| {name:32} | {peak / 2**20:9.1f} | {peak / baseline:19.3f} |")


if __name__ == "__main__":
    main()
