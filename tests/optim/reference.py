"""Independent references for the core tests: the Sophia contract transcribed in float64 NumPy.

The references import nothing from ``sophia``: they are the specification the optimizer is held
to, written from the contract, not from the code under test::

    θ ← θ·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  θ ← θ − lr·clamp(m / max(ρ·h, ε), −1, 1)
    every k steps:      h ← β2·h + (1 − β2)·ĥ
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch


@dataclass
class ReferenceParam:
    """One parameter of the reference: θ, m and h as float64 arrays, m and h starting at zero."""

    theta: np.ndarray
    exp_avg: np.ndarray = field(init=False)
    hessian: np.ndarray = field(init=False)
    steps: int = 0

    def __post_init__(self) -> None:
        self.theta = np.array(self.theta, dtype=np.float64)
        self.exp_avg = np.zeros_like(self.theta)
        self.hessian = np.zeros_like(self.theta)


def reference_step(
    param: ReferenceParam,
    grad: np.ndarray,
    *,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
) -> None:
    """One Sophia step of the contract, in float64, in place on ``param``."""
    g = -np.asarray(grad, np.float64) if maximize else np.asarray(grad, np.float64)
    param.theta = param.theta * (1.0 - lr * weight_decay)
    param.exp_avg = beta1 * param.exp_avg + (1.0 - beta1) * g
    denominator = np.maximum(rho * param.hessian, eps)
    param.theta = param.theta - lr * np.clip(param.exp_avg / denominator, -1.0, 1.0)
    param.steps += 1


def reference_refresh(param: ReferenceParam, estimate: np.ndarray, *, beta2: float) -> None:
    """Fold a Hessian-diagonal estimate ĥ into h: ``h ← β2·h + (1 − β2)·ĥ``."""
    param.hessian = beta2 * param.hessian + (1.0 - beta2) * np.asarray(estimate, np.float64)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy of ``tensor`` (any floating dtype, bf16 included)."""
    return tensor.detach().to(torch.float64).cpu().numpy()


def bf16_ulp(values: np.ndarray) -> np.ndarray:
    """The spacing of bfloat16 numbers at ``values`` (8 significant bits: 2^(e − 7))."""
    magnitude = np.maximum(np.abs(values), np.finfo(np.float32).tiny)
    return np.exp2(np.floor(np.log2(magnitude)) - 7)


def optimizer_paths() -> dict[str, dict]:
    """Constructor flags of every step path: the for-loop ground truth, foreach, and the fused
    CPU kernel where the optimizer offers one and it can be built on this machine."""
    import inspect

    import sophia_pytorch
    paths = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}}
    if "fused" in inspect.signature(sophia_pytorch.SophiaG).parameters:
        paths["for-loop"]["fused"] = False
        from sophia_pytorch.functional import fused_kernel_available

        if fused_kernel_available():
            paths["fused"] = {"fused": True}
    return paths


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the count.

    For loops of thousands of tiny ops: on a busy shared machine every op that wakes torch's
    thread pool can wait milliseconds for a core, which would make a Monte-Carlo test slow.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def torch_on_one_thread() -> Iterator[None]:
    """Autouse in the core test modules that import it: their tensors are tiny, and on a busy
    shared machine two intra-op threads cost more in waiting than they save."""
    with one_thread():
        yield
