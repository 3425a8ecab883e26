"""One Hessian refresh: estimate on these chunks, average over ranks, fold into h.

Every caller — the harness's training loop, the Hugging Face and Lightning integrations, a
hand-written loop — refreshes Sophia's h through this module, so the rule exists once:

* :func:`gauss_newton_bartlett` (SophiaG): on each chunk a forward, targets drawn from the
  distribution the model predicts (a *sampled loss*: :func:`~.sampled_cross_entropy`,
  :func:`~.sampled_gaussian_nll`, :func:`~.sampled_binary_cross_entropy`, or your own — the
  pluggable part, as optax's ``hessian_diagonal_fn``), a backward; gradients summed over the
  chunks, averaged over data-parallel ranks, and ``update_hessian(scale=…)`` so that h gets
  B·ĝ⊙ĝ with ĝ the gradient of the mean over all B sampled positions of all ranks.
* :func:`hutchinson` (SophiaH): ``update_hessian(closure)`` on one chunk's loss; SophiaH
  averages its estimate over ranks with the same all-reduce.
* :func:`refresh_generator`: the random source of one refresh, a pure function of (seed,
  key, rank), so a resumed run draws what an unbroken one would.
* What a trainer holds goes in as keywords: its GradScaler (``scaler``), its mixed-precision
  context (``autocast``); :func:`find_sophia` unwraps the optimizer a trainer wraps.

Sample counts stay tensors; a Gauss-Newton-Bartlett refresh reads the device once, for the
total count (a refresh with no sampled position is skipped, not folded in as a zero estimate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ._dtensor import all_reduce_mean, is_dtensor
from .estimators import sampled_binary_cross_entropy, sampled_cross_entropy, sampled_gaussian_nll
from .optimizer import SophiaG, SophiaH

__all__ = [
    "Autocast",
    "Chunk",
    "LogitsAndMask",
    "SampledLoss",
    "SAMPLED_LOSSES",
    "find_sophia",
    "gauss_newton_bartlett",
    "hutchinson",
    "refresh_generator",
    "sampled_loss",
]

LogitsAndMask = tuple[Tensor, "Tensor | None"]
"""``(logits, mask)``: ``(..., C)`` outputs and an optional ``(...)`` bool tensor of the
positions to sample (True); padding and positions without a target are False."""

Autocast = Callable[[], "contextlib.AbstractContextManager[object]"]
"""Makes the mixed-precision context of the training forward (``lambda: torch.autocast(…)``,
Lightning's ``precision.forward_context``), entered once per forward."""

Chunk = Callable[[], LogitsAndMask]
"""A chunk of the refresh batch: runs the forward (under the caller's autocast and wrappers)
and returns ``(outputs, mask)``: ``(..., C)`` outputs and an optional ``(...)`` bool tensor of
the positions to sample (True); padding and positions without a target are False."""


class SampledLoss(Protocol):
    """``loss_fn(outputs, mask=…, generator=…, count_as_tensor=True) -> (loss, count)``: the
    mean over the kept positions of a loss on targets drawn from the model's own predictive
    distribution, and the number of those positions as a 0-dim tensor."""

    def __call__(self, outputs: Tensor, /, *, mask: Tensor | None,
                 generator: torch.Generator | None,
                 count_as_tensor: Literal[True]) -> tuple[Tensor, Tensor]: ...


SAMPLED_LOSSES: dict[str, SampledLoss] = {
    "cross_entropy": sampled_cross_entropy,  # softmax heads: LMs, classification
    "gaussian": sampled_gaussian_nll,  # regression (MSE) heads, σ² = 1
    "bernoulli": sampled_binary_cross_entropy,  # binary and multi-label (BCE) heads
}
"""The sampled losses by the name the integrations' ``hessian_loss=`` takes."""


def sampled_loss(choice: str | SampledLoss) -> SampledLoss:
    """The sampled loss named by ``choice`` (a key of :data:`SAMPLED_LOSSES`), or ``choice``
    itself when it is callable.

    Raises:
        ValueError: for another name, listing the known ones.
    """
    if callable(choice):
        return choice
    if choice not in SAMPLED_LOSSES:
        raise ValueError(
            f"unknown hessian_loss {choice!r}: use one of {sorted(SAMPLED_LOSSES)} or a callable "
            "(outputs, *, mask, generator, count_as_tensor) -> (loss, count)"
        )
    return SAMPLED_LOSSES[choice]


_Out = TypeVar("_Out")
_RANK_STRIDE = 0x9E3779B1  # 2³²/φ: ranks' seeds lie far apart from each other's keys


def refresh_generator(seed: int, key: int, *, rank: int = 0,
                      device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one refresh's draws, seeded from ``(seed, key, rank)`` only.

    Args:
        seed: the run's seed.
        key: what tells this refresh from the run's others, e.g. the optimizer step it follows.
        rank: the data-parallel rank for draws that should differ across ranks (Sophia-G's
            targets: independent draws average better); 0 on every rank for draws that must
            agree (Sophia-H's probes, whose per-rank estimates are averaged as one).
        device: the device the draws are made on.

    The seed is ``(seed·1000003 + key + r·2654435761) mod 2³²`` on rank r (CPU generators use
    32 bits): rank r's stream is another rank's only 2.6·10⁹·r keys later.
    """
    value = (seed * 1_000_003 + key + rank * _RANK_STRIDE) % 2**32
    return torch.Generator(device=device).manual_seed(value)


def _checked_output(output: object, loss_fn: SampledLoss) -> tuple[Tensor, Tensor]:
    """A sampled loss's ``(loss, count)``, the count as a 0-dim int64 tensor (an int is
    accepted); anything else is a TypeError naming the callable."""
    name = getattr(loss_fn, "__name__", repr(loss_fn))
    if not (isinstance(output, tuple) and len(output) == 2):
        raise TypeError(f"the sampled loss {name} must return (loss, count), got "
                        f"{type(output).__name__}")
    mean, count = output
    if not (isinstance(mean, Tensor) and mean.dim() == 0 and mean.is_floating_point()):
        raise TypeError(f"the sampled loss {name} must return its loss as a 0-dim float "
                        f"tensor, got {mean!r:.80}")
    if isinstance(count, int) and not isinstance(count, bool):
        count = torch.tensor(count, dtype=torch.int64, device=mean.device)
    if not (isinstance(count, Tensor) and count.numel() == 1
            and not count.is_floating_point() and not count.is_complex()):
        raise TypeError(f"the sampled loss {name} must return its count of sampled positions "
                        f"as an int or a one-element integer tensor, got {count!r:.80}")
    return mean, count.reshape(()).to(torch.int64)


def find_sophia(optimizer: object) -> SophiaG | SophiaH:
    """The SophiaG/SophiaH inside ``optimizer``, unwrapping ``.optimizer`` attributes
    (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``).

    Args:
        optimizer: a SophiaG or SophiaH, or a wrapper holding one as ``.optimizer`` (up to
            eight wrappers deep).

    Raises:
        TypeError: when there is none, naming what was found.
    """
    found = optimizer
    for _ in range(8):
        if isinstance(found, (SophiaG, SophiaH)):
            return found
        if not hasattr(found, "optimizer"):
            break
        found = found.optimizer
    raise TypeError(
        f"the Hessian refresh needs a sophia_pytorch SophiaG or SophiaH optimizer, got "
        f"{type(found).__name__}"
    )


def _loss_scale(grad_scale: float | Tensor | None,
                scaler: torch.amp.GradScaler | None) -> float | Tensor | None:
    """The scale the refresh's loss is multiplied by: ``grad_scale``, or the ``scaler``'s
    current one when it is enabled (not both)."""
    if scaler is None or not scaler.is_enabled():
        return grad_scale
    if grad_scale is not None:
        raise ValueError("pass grad_scale or scaler, not both: the scaler gives the scale")
    return scaler.get_scale()


def _under(autocast: Autocast | None, forward: Callable[[], _Out]) -> Callable[[], _Out]:
    """``forward`` run inside a fresh ``autocast()`` context (as it is without one)."""
    if autocast is None:
        return forward

    def wrapped() -> _Out:
        with autocast():
            return forward()

    return wrapped


def _data_parallel_world(synchronize: bool) -> int:
    if not synchronize or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _sum_over_ranks(count: Tensor, world: int) -> Tensor:
    if world == 1:
        return count
    total = count.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gauss_newton_bartlett(
    optimizer: SophiaG,
    chunks: Sequence[Chunk],
    *,
    loss: str | SampledLoss = "cross_entropy",
    generator: torch.Generator | None = None,
    grad_scale: float | Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Autocast | None = None,
    synchronize: bool = True,
) -> bool:
    """Refresh SophiaG's h from targets sampled from the model on ``chunks``.

    Clears the gradients of ``optimizer``'s parameters before and after, and writes no other
    parameter's gradient (except under FSDP2, whose DTensor shards take a plain backward). Each
    chunk is forwarded and back-propagated in turn (one chunk's graph alive at a time): its sampled
    loss, a sum over its kept positions, is divided by a normaliser N that every rank agrees
    on before the first backward (the kept positions of the first chunk over all ranks, times
    the number of chunks; exactly B for one chunk), so gradients stay on the scale of a mean
    — which keeps fp16 in range — whatever the ranks' counts. Afterwards the plain gradients
    are averaged over ranks in one bucketed all-reduce (DTensor gradients of FSDP2 arrive
    averaged by their reduce-scatter) and hold S/N, S the gradient of the sum over all B
    positions; ``update_hessian(scale=N²/B)`` then folds in B·(S/B)⊙(S/B).

    Args:
        optimizer: the SophiaG whose h to refresh.
        chunks: one or more :data:`Chunk` callables; their forwards must not reduce gradients
            across ranks themselves (call the unwrapped model, or DDP's under ``no_sync``).
        loss: the sampled loss: ``"cross_entropy"`` (default), ``"gaussian"``,
            ``"bernoulli"``, or a :class:`SampledLoss` callable.
        generator: random source of the targets, on the outputs' device (default: global).
            Differ it across ranks (:func:`refresh_generator` with the rank).
        grad_scale: the loss scale of a GradScaler (``scaler.get_scale()``) or None: the loss
            is multiplied by it before backward, ``update_hessian`` unscales, and a non-finite
            gradient skips the refresh. The scaler itself is not touched.
        scaler: the training step's GradScaler, instead of ``grad_scale``: its current scale
            is used when it is enabled; its state (scale, growth tracker) is not touched.
        autocast: makes the training forward's mixed-precision context, entered around each
            chunk's forward (default None: the chunks as they are).
        synchronize: average over the default process group when one is initialised (default
            True); False for a process group that is not data-parallel.

    Returns:
        True when the estimate was folded into h; False when it was skipped (a gradient not
        finite under ``grad_scale``, or no position sampled on any rank: every one masked),
        leaving h and the refresh count as they were.

    Raises:
        TypeError: a ``loss`` callable that does not return ``(loss tensor, count)``.
    """
    if not chunks:
        raise ValueError("gauss_newton_bartlett needs at least one chunk")
    grad_scale = _loss_scale(grad_scale, scaler)
    chunks = [_under(autocast, chunk) for chunk in chunks]
    loss_fn = sampled_loss(loss)
    world = _data_parallel_world(synchronize)
    optimizer.zero_grad(set_to_none=True)
    # The sampled loss's gradient goes to this optimizer's parameters only: another
    # optimizer's gradients (Lightning with two, Muon beside Sophia) are left as they were.
    # FSDP2 gathers its shards outside autograd, so DTensor parameters take a plain backward.
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if not params:
        raise ValueError("gauss_newton_bartlett: the optimizer holds no parameter that requires "
                         "grad, so there is no Hessian to refresh; unfreeze its parameters or "
                         "stop refreshing it")
    inputs = None if any(is_dtensor(p) for p in params) else params
    normaliser: Tensor | None = None
    total = torch.zeros((), dtype=torch.int64)
    for chunk in chunks:
        outputs, mask = chunk()
        mean, count = _checked_output(
            loss_fn(outputs, mask=mask, generator=generator, count_as_tensor=True), loss_fn)
        if normaliser is None:
            normaliser = _sum_over_ranks(count, world) * len(chunks)
            total = count
        else:
            total = total + count.to(total.device)
        # In float32 (float64): a float16 count or sum overflows at 65,504 positions.
        wide = torch.float64 if mean.dtype == torch.float64 else torch.float32
        chunk_sum = mean.to(wide) * count.to(wide)
        scaled = chunk_sum * (world / normaliser.clamp(min=1).to(wide))
        if grad_scale is not None:
            scaled = scaled * grad_scale
        scaled.backward(inputs=inputs)  # type: ignore[no-untyped-call]  # unannotated in torch
    assert normaliser is not None  # set by the first chunk; chunks is not empty
    if len(chunks) > 1:
        total = _sum_over_ranks(total, world)
    sampled = normaliser if len(chunks) == 1 else total  # positions over all ranks and chunks
    if not bool(sampled > 0):  # one host read: nothing was sampled, there is no estimate
        optimizer.zero_grad(set_to_none=True)
        return False
    if world > 1:
        all_reduce_mean([p.grad for group in optimizer.param_groups for p in group["params"]
                         if p.grad is not None and not is_dtensor(p.grad)])
    if len(chunks) == 1:
        scale = normaliser  # N = B of all ranks: the same number, without rounding N²/B
    else:
        normaliser = normaliser.clamp(min=1).to(torch.float32)
        scale = normaliser * normaliser / total.clamp(min=1).to(normaliser)
    folded = optimizer.update_hessian(scale=scale, grad_scale=grad_scale)
    optimizer.zero_grad(set_to_none=True)
    return folded


def hutchinson(
    optimizer: SophiaH,
    loss_fn: Callable[[], Tensor],
    *,
    generator: torch.Generator | None = None,
    grad_scale: float | Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Autocast | None = None,
) -> bool:
    """Refresh SophiaH's h with one Hutchinson estimate of ``loss_fn``'s Hessian diagonal.

    Args:
        optimizer: the SophiaH whose h to refresh.
        loss_fn: recomputes the training loss (a 0-dim tensor; no backward), under the
            caller's autocast; it is evaluated under the math attention backend.
        generator: random source of the probes; the same on every rank
            (:func:`refresh_generator` with rank 0), so that the ranks' estimates, which
            SophiaH averages, use one probe.
        grad_scale: as in :func:`gauss_newton_bartlett`.
        scaler: as in :func:`gauss_newton_bartlett`, instead of ``grad_scale``.
        autocast: as in :func:`gauss_newton_bartlett`, entered around ``loss_fn``.

    Returns:
        True when folded; False when skipped (not finite, under ``grad_scale``).
    """
    grad_scale = _loss_scale(grad_scale, scaler)
    loss_fn = _under(autocast, loss_fn)

    def closure() -> Tensor:
        value = loss_fn()
        return value * grad_scale if grad_scale is not None else value

    return optimizer.update_hessian(closure, generator=generator, grad_scale=grad_scale)
