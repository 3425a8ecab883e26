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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..optimizer import SophiaG, SophiaH
from ..refresh import (
    LogitsAndMask,
    SampledLoss,
    gauss_newton_bartlett,
    refresh_generator,
    sampled_loss,
)

__all__ = ["SophiaHessianCallback"]

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


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
if TYPE_CHECKING:
    from lightning.pytorch import Callback as _Callback
else:
    # Subclass every installed ``Callback``, so one callback serves lightning and
    # pytorch_lightning alike; mypy checks against lightning.pytorch's.
    _CALLBACKS = tuple(module.Callback for module in _LIGHTNING.values())
    _Callback = _CALLBACKS[0] if len(_CALLBACKS) == 1 else type("_Callback", _CALLBACKS, {})
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


class SophiaHessianCallback(_Callback):
    """Refreshes SophiaG's h after every optimizer step that makes one due.

    Right after each optimizer step (a ``step_post_hook`` on the SophiaG: one per
    ``accumulate_grad_batches`` micro-batches, and every step of a manual-optimization
    ``training_step``, however many it takes), when ``optimizer.hessian_due()`` (every
    ``refresh_every`` steps), it runs on the current batch: a forward under the trainer's
    precision (autocast for ``16-mixed`` and ``bf16-mixed``), targets drawn from the model's
    predictive distribution where the mask is True, backward (scaled by the GradScaler under
    ``16-mixed``), gradients averaged over DDP ranks, and ``update_hessian(scale=B)`` with B
    the positions sampled over all ranks. With ``refresh_at_start=True`` on the optimizer it
    also refreshes before the first step.

    Args:
        logits_fn: ``logits_fn(pl_module, batch) -> (logits, mask)``, logits ``(..., C)`` and
            mask ``(...)`` bool or None. Default: ``batch`` is ``(inputs, targets)``,
            ``logits = pl_module(inputs)`` and ``mask = targets != ignore_index``.
        ignore_index: the target value of positions to leave out (default -100).
        seed: seed of the target draws, with the step and the rank
            (:func:`sophia_pytorch.refresh.refresh_generator`; default 0).
        hessian_loss: the likelihood of the model's loss: ``"cross_entropy"`` (softmax),
            ``"gaussian"`` (MSE, σ² = 1), ``"bernoulli"`` (BCE, multi-label) or a callable
            (:class:`sophia_pytorch.refresh.SampledLoss`). Default None: cross-entropy for
            integer targets shaped like the logits without their last dimension (or with
            ``logits_fn``); float targets must name theirs (MSE and BCE both take them).

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
        hessian_loss: str | SampledLoss | None = None,
    ) -> None:
        if hessian_loss is not None:
            sampled_loss(hessian_loss)  # an unknown name fails here, not at the first refresh
        self.logits_fn = logits_fn
        self.ignore_index = ignore_index
        self.seed = seed
        self.hessian_loss = hessian_loss
        self.refreshes = 0
        """Refreshes folded into h so far."""
        self.refreshes_skipped = 0
        """Refreshes skipped because a gradient was not finite (16-mixed)."""
        self._start_tried = False
        self._batch: Any = None
        self._hook: Any = None

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
        """Hook the refresh onto every step of the SophiaG.

        Args:
            trainer: the Lightning ``Trainer``; its optimizers hold exactly one SophiaG.
            pl_module: the ``LightningModule`` being trained.
        """
        self._remove_hook()
        self._hook = self._sophia(trainer).register_step_post_hook(
            lambda optimizer, args, kwargs: self._after_step(trainer, pl_module))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Unhook the refresh from the SophiaG.

        Args:
            trainer: the Lightning ``Trainer``.
            pl_module: the ``LightningModule`` that was trained.
        """
        self._remove_hook()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Unhook the refresh from the SophiaG (when training ended early, too).

        Args:
            trainer: the Lightning ``Trainer``.
            pl_module: the ``LightningModule``.
            stage: Lightning's stage being torn down (``"fit"``, ``"validate"``, …).
        """
        self._remove_hook()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        """Keep the batch for the refreshes after this batch's steps; before the first step,
        do the refresh that ``refresh_at_start`` makes due (tried once: a later micro-batch
        holds accumulated gradients that a refresh would clear)."""
        self._batch = batch
        if self._start_tried:
            return
        self._start_tried = True
        sophia = self._sophia(trainer)
        if sophia.steps_taken() == 0 and sophia.hessian_due():
            self.refresh(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Forget the batch kept by :meth:`on_train_batch_start`: its steps are done."""
        self._batch = None

    def _after_step(self, trainer: Any, pl_module: Any) -> None:
        """After an optimizer step: refresh when one is due. Once per step: a refresh that was
        skipped (not finite) stays due, but is not retried until the next step, since
        mid-window the gradients are being accumulated."""
        if self._batch is not None and self._sophia(trainer).hessian_due():
            with torch.enable_grad():
                self.refresh(trainer, pl_module, self._batch)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------------ refresh
    def refresh(self, trainer: Any, pl_module: Any, batch: Any) -> bool:
        """One refresh of h on ``batch``.

        Args:
            trainer: the Lightning ``Trainer``, for its SophiaG, precision plugin and rank.
            pl_module: the ``LightningModule``, whose forward gives the logits.
            batch: the training batch, as ``training_step`` gets it; read by
                :meth:`logits_and_mask`.

        Returns:
            True when the estimate was folded in, False when it was skipped (a gradient not
            finite under the 16-mixed GradScaler).
        """
        sophia = self._sophia(trainer)
        precision = trainer.precision_plugin
        autocast = (precision.forward_context if hasattr(precision, "forward_context")
                    else contextlib.nullcontext)
        folded = gauss_newton_bartlett(
            sophia, [lambda: self.logits_and_mask(pl_module, batch)], loss=self.chosen_loss,
            generator=refresh_generator(self.seed, sophia.steps_taken(),
                                        rank=trainer.global_rank, device=pl_module.device),
            scaler=getattr(precision, "scaler", None), autocast=autocast,
            synchronize=trainer.world_size > 1,
        )
        if folded:
            self.refreshes += 1
        else:
            self.refreshes_skipped += 1
        return folded

    def logits_and_mask(self, pl_module: Any, batch: Any) -> LogitsAndMask:
        """``logits_fn(pl_module, batch)``, or the default for ``(inputs, targets)`` batches;
        the sampled loss is :attr:`chosen_loss`.

        Args:
            pl_module: the ``LightningModule``; the default calls ``pl_module(inputs)``.
            batch: the training batch; the default reads ``(inputs, targets)``, targets shaped
                like the logits without their last dimension, ``(...)``.

        Returns:
            ``(logits, mask)``: logits of shape ``(..., C)`` and a ``(...)`` bool mask (or
            None) of the positions to sample.
        """
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
        if self.chosen_loss != "cross_entropy" and not callable(self.chosen_loss):
            return logits, None  # Gaussian, Bernoulli: every row, as the model's MSE or BCE
        if self.hessian_loss is None and targets.is_floating_point():
            raise ValueError(
                f"SophiaHessianCallback got float targets {tuple(targets.shape)}: a regression "
                "(MSE) or a multi-label (BCE) head? Pass hessian_loss='gaussian' or "
                "'bernoulli' (or a callable)"
            )
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"targets of shape {tuple(targets.shape)} do not line up with logits of shape "
                f"{tuple(logits.shape)} (classes last); pass "
                "logits_fn=lambda pl_module, batch: (logits, mask)"
            )
        return logits, targets != self.ignore_index

    @property
    def chosen_loss(self) -> str | SampledLoss:
        """The sampled loss of every refresh: ``hessian_loss``, or ``"cross_entropy"``."""
        return self.hessian_loss or "cross_entropy"

    # ------------------------------------------------------------------------ helpers
    def _sophia(self, trainer: Any) -> SophiaG:
        if any(isinstance(o, SophiaH) for o in trainer.optimizers):
            raise TypeError(_SOPHIA_H_RECIPE)
        found = [o for o in trainer.optimizers if isinstance(o, SophiaG)]
        if len(found) != 1:
            names = [type(o).__name__ for o in trainer.optimizers]
            raise TypeError(
                "SophiaHessianCallback needs exactly one SophiaG among the optimizers "
                f"configure_optimizers returns, got {names}"
            )
        return found[0]
