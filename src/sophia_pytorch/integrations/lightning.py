"""``SophiaHessianCallback``: Sophia-G's Hessian refresh in a Lightning ``Trainer``.

    >>> trainer = L.Trainer(callbacks=[SophiaHessianCallback()], accumulate_grad_batches=4)

Works with ``lightning`` (``import lightning as L``) and ``pytorch_lightning``, whichever is
installed; with both, one callback serves both (it subclasses both ``Callback`` classes).
Needs ``pip install 'sophia-pytorch[lightning]'``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..optimizer import SophiaG, SophiaH
from .refresh import LogitsAndMask, gauss_newton_refresh

__all__ = ["SophiaHessianCallback"]

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")
_LABEL_SEED_OFFSET = 1_000_003


def _installed() -> dict[str, Any]:
    """The Lightning packages importable here: ``{name: module}``, ``lightning.pytorch`` first."""
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name.split(".")[0]:  # installed, but broken: say why
                raise
    if not found:
        raise ImportError(
            "sophia_pytorch.integrations.lightning needs Lightning: pip install "
            "'sophia-pytorch[lightning]' (or lightning, or pytorch_lightning)"
        )
    return found


_LIGHTNING = _installed()
_SOPHIA_H_RECIPE = (
    "SophiaHessianCallback refreshes SophiaG; for SophiaH use manual optimization and call "
    "optimizer.update_hessian(closure) in training_step (recipe: docs/INTEGRATIONS.md)"
)


def _package_of(trainer: Any) -> Any:
    root = type(trainer).__module__.split(".")[0]
    return _LIGHTNING["lightning.pytorch" if root == "lightning" else "pytorch_lightning"]


def _output_logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if logits is None:
        logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(
            "SophiaHessianCallback calls pl_module(inputs) and expects logits (a tensor, or an "
            f"output with `logits`), got {type(output).__name__}; pass "
            "logits_fn=lambda pl_module, batch: (logits, mask)"
        )
    return logits


class SophiaHessianCallback(*(module.Callback for module in _LIGHTNING.values())):
    """Refreshes SophiaG's h after every optimizer step that makes one due.

    After an optimizer step — one per ``accumulate_grad_batches`` micro-batches — when
    ``optimizer.hessian_due()`` (every ``refresh_every`` steps), it runs on that step's last
    batch: a forward under the trainer's precision (autocast for ``16-mixed`` and
    ``bf16-mixed``), labels drawn from the model's softmax where the mask is True, backward
    (scaled by the GradScaler under ``16-mixed``), gradients averaged over DDP ranks, and
    ``update_hessian(scale=B)`` with B the positions sampled over all ranks. With
    ``refresh_at_start=True`` on the optimizer it also refreshes before the first step.

    Args:
        logits_fn: ``logits_fn(pl_module, batch) -> (logits, mask)``, logits ``(..., C)`` and
            mask ``(...)`` bool or None. Default: ``batch`` is ``(inputs, targets)``,
            ``logits = pl_module(inputs)`` and ``mask = targets != ignore_index``.
        ignore_index: the target value of positions to leave out (default -100).
        seed: seed of the label generator; rank r draws from ``seed`` + a rank offset
            (default 0).

    The optimizer is the SophiaG among ``configure_optimizers``'s. Strategies: one device
    and DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``). SophiaH needs a closure and a double
    backward, which belong in ``training_step``: see the manual-optimization recipe in
    docs/INTEGRATIONS.md.
    """

    def __init__(
        self,
        logits_fn: Callable[[Any, Any], LogitsAndMask] | None = None,
        *,
        ignore_index: int = -100,
        seed: int = 0,
    ) -> None:
        self.logits_fn = logits_fn
        self.ignore_index = ignore_index
        self.seed = seed
        self.refreshes = 0
        """Refreshes folded into h so far."""
        self.refreshes_skipped = 0
        """Refreshes skipped because a gradient was not finite (16-mixed)."""
        self._generator: torch.Generator | None = None
        self._steps_seen = 0
        self._start_tried = False

    # -------------------------------------------------------------------------- hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse strategies whose gradients the refresh cannot average (FSDP, DeepSpeed)."""
        package = _package_of(trainer)
        if trainer.world_size > 1 and not isinstance(trainer.strategy,
                                                     package.strategies.DDPStrategy):
            raise NotImplementedError(
                "SophiaHessianCallback supports one device and DDP strategies, got "
                f"{type(trainer.strategy).__name__}"
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._steps_seen = self._sophia(trainer).steps_taken()  # > 0 when resumed

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        """Before the first step: the refresh that ``refresh_at_start`` makes due (tried once:
        a later micro-batch holds accumulated gradients that a refresh would clear)."""
        if self._start_tried:
            return
        self._start_tried = True
        sophia = self._sophia(trainer)
        if sophia.steps_taken() == 0 and sophia.hessian_due():
            self.refresh(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After a micro-batch: refresh when it ended with an optimizer step and a refresh is
        due. Only then: mid-window the gradients are being accumulated, and a refresh that was
        skipped (not finite) stays due until the next step."""
        sophia = self._sophia(trainer)
        taken = sophia.steps_taken()
        if taken == self._steps_seen:
            return
        self._steps_seen = taken
        if sophia.hessian_due():
            self.refresh(trainer, pl_module, batch)

    # ------------------------------------------------------------------------ refresh
    def refresh(self, trainer: Any, pl_module: Any, batch: Any) -> bool:
        """One refresh of h on ``batch``.

        Returns:
            True when the estimate was folded in, False when it was skipped (a gradient not
            finite under the 16-mixed GradScaler).
        """
        sophia = self._sophia(trainer)
        precision = trainer.precision_plugin
        autocast = (precision.forward_context() if hasattr(precision, "forward_context")
                    else contextlib.nullcontext())
        folded = gauss_newton_refresh(
            sophia, lambda: self.logits_and_mask(pl_module, batch),
            generator=self._generator_for(trainer, pl_module),
            scaler=getattr(precision, "scaler", None), autocast=autocast,
            synchronize=trainer.world_size > 1,
        )
        if folded:
            self.refreshes += 1
        else:
            self.refreshes_skipped += 1
        return folded

    def logits_and_mask(self, pl_module: Any, batch: Any) -> LogitsAndMask:
        """``logits_fn(pl_module, batch)``, or the default for ``(inputs, targets)`` batches."""
        if self.logits_fn is not None:
            return self.logits_fn(pl_module, batch)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                "SophiaHessianCallback reads batches shaped (inputs, targets), got "
                f"{type(batch).__name__}"
                f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; "
                "pass logits_fn=lambda pl_module, batch: (logits, mask)"
            )
        inputs, targets = batch
        logits = _output_logits(pl_module(inputs))
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"targets of shape {tuple(targets.shape)} do not line up with logits of shape "
                f"{tuple(logits.shape)} (classes last); pass "
                "logits_fn=lambda pl_module, batch: (logits, mask)"
            )
        return logits, targets != self.ignore_index

    # ------------------------------------------------------------------------ helpers
    def _sophia(self, trainer: Any) -> SophiaG:
        found = [o for o in trainer.optimizers if isinstance(o, (SophiaG, SophiaH))]
        if any(isinstance(o, SophiaH) for o in found):
            raise TypeError(_SOPHIA_H_RECIPE)
        if len(found) != 1:
            names = [type(o).__name__ for o in trainer.optimizers]
            raise TypeError(
                "SophiaHessianCallback needs exactly one SophiaG among the optimizers "
                f"configure_optimizers returns, got {names}"
            )
        return found[0]

    def _generator_for(self, trainer: Any, pl_module: Any) -> torch.Generator:
        if self._generator is None:
            generator = torch.Generator(device=pl_module.device)
            seed = self.seed + _LABEL_SEED_OFFSET * (trainer.global_rank + 1)
            self._generator = generator.manual_seed(seed)
        return self._generator
