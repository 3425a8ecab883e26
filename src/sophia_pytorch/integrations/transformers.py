"""``SophiaTrainer``: Hugging Face's ``transformers.Trainer`` with Sophia's Hessian refresh.

    >>> trainer = SophiaTrainer(model=model, args=args, train_dataset=data,
    ...                         sophia_kwargs={"rho": 0.05, "refresh_every": 10})
    >>> trainer.train()

Needs ``pip install 'sophia-pytorch[transformers]'`` (transformers ≥ 4.46, accelerate).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..optimizer import SophiaG, SophiaH
from .refresh import LogitsAndMask, find_sophia, gauss_newton_refresh, hutchinson_refresh

__all__ = ["SophiaTrainer"]

_RESERVED = ("lr", "weight_decay")
_LABEL_SEED_OFFSET = 1_000_003  # label streams of different ranks start far apart


class SophiaTrainer(Trainer):
    """A ``transformers.Trainer`` that refreshes SophiaG's or SophiaH's Hessian estimate.

    After every optimizer step whose count is a multiple of ``refresh_every`` (when
    ``optimizer.hessian_due()``), it runs one refresh on the last micro-batch of that step:

    * SophiaG: forward without the labels, labels drawn from the model at the positions whose
      (shifted) label is not -100, backward, ``update_hessian(scale=B)`` with B the positions
      sampled over all ranks;
    * SophiaH: ``update_hessian(closure)`` with the model's own loss on the batch (a double
      backward, under the math attention backend).

    With ``refresh_at_start=True`` on the optimizer, it also refreshes on the first
    micro-batch, before the first step.

    Args:
        *args, **kwargs: those of ``transformers.Trainer``. Pass ``optimizers=(SophiaG(...),
            scheduler or None)`` — or SophiaH — or no optimizer: then a SophiaG is built with
            ``lr=args.learning_rate``, ``weight_decay=args.weight_decay`` (0 for biases and
            norms, as the Trainer does for AdamW) and ``sophia_kwargs``.
        sophia_kwargs: further keywords of the SophiaG it builds (``rho``, ``betas``,
            ``refresh_every``, …); not ``lr`` or ``weight_decay``, which come from ``args``.
        shift_labels: True (default) for causal LMs, whose label at position t is the token
            predicted at t − 1: the refresh pairs ``logits[:, :-1]`` with ``labels[:, 1:]``.
            False for models whose labels line up with the logits (masked LM, token
            classification).

    How it hooks in: ``training_step`` keeps a reference to its micro-batch, and a
    ``TrainerCallback.on_step_end`` does the refresh. ``on_step_end`` runs once per optimizer
    step, after ``optimizer.step()`` and ``zero_grad`` and outside accelerate's ``no_sync``,
    in every Trainer from 4.46 to 5.x; ``training_step`` runs once per micro-batch, before the
    step, sometimes inside ``no_sync``, and its signature changed across versions (it takes and
    passes on ``*args, **kwargs``). The refresh runs the unwrapped model and averages its
    gradients over ranks itself (:mod:`sophia_pytorch.integrations.refresh`), so DDP's reducer
    plays no part. A step that the GradScaler skipped does not advance the optimizer's count,
    so it triggers no second refresh. The label generator is seeded with ``args.seed`` and the
    rank, the probe generator with ``args.seed`` (the same probes on every rank).

    Supported: one process, DDP (``torchrun``), fp32, fp16 with accelerate's GradScaler, bf16.
    Not supported: DeepSpeed, FSDP (the refresh would bypass their gradient handling).
    """

    def __init__(
        self,
        *args: Any,
        sophia_kwargs: Mapping[str, Any] | None = None,
        shift_labels: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sophia_kwargs = dict(sophia_kwargs or {})
        reserved = [key for key in _RESERVED if key in self.sophia_kwargs]
        if reserved:
            raise ValueError(
                f"sophia_kwargs may not set {reserved}: SophiaTrainer takes lr and weight_decay "
                "from TrainingArguments(learning_rate=..., weight_decay=...)"
            )
        if self.sophia_kwargs and self.optimizer is not None:
            raise ValueError(
                "sophia_kwargs configures the SophiaG that SophiaTrainer builds, but an optimizer "
                "was passed in `optimizers`: set its keywords there instead"
            )
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError(
                "SophiaTrainer supports one process and DDP; DeepSpeed and FSDP manage gradients "
                "themselves and the Hessian refresh would bypass them"
            )
        self.shift_labels = shift_labels
        self.hessian_refreshes = 0
        """Refreshes folded into h so far (not counting skipped ones)."""
        self.hessian_refreshes_skipped = 0
        """Refreshes skipped because a gradient was not finite (fp16)."""
        self._refresh_batch: dict[str, Any] | None = None
        self._start_refresh_tried = False
        self._generators: dict[str, torch.Generator] = {}
        self.add_callback(_RefreshAfterStep(self))

    # ------------------------------------------------------------------ the optimizer
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Build SophiaG from ``args`` and ``sophia_kwargs`` unless an optimizer was passed."""
        if self.optimizer is None:
            model = self.model
            decay = set(self.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay],
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            self.optimizer = SophiaG(
                [g for g in groups if g["params"]], lr=self.args.learning_rate,
                **self.sophia_kwargs,
            )
        return self.optimizer

    def _sophia(self) -> SophiaG | SophiaH:
        try:
            return find_sophia(self.optimizer)
        except TypeError as error:
            raise TypeError(
                f"SophiaTrainer {error}: pass optimizers=(SophiaG(...), None), or no optimizer"
            ) from None

    # ---------------------------------------------------------------- the training step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any,
                      **kwargs: Any) -> Tensor:
        """The Trainer's step; it remembers ``inputs`` for the refresh after the optimizer step
        and, before the first step, does the refresh that ``refresh_at_start`` makes due."""
        self._refresh_batch = inputs
        if not self._start_refresh_tried:
            self._start_refresh_tried = True
            sophia = self._sophia()
            if sophia.steps_taken() == 0 and sophia.hessian_due():
                self.refresh_hessian(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    # --------------------------------------------------------------------- the refresh
    def hessian_logits_and_mask(self, model: nn.Module, inputs: dict[str, Any]) -> LogitsAndMask:
        """``(logits, mask)`` of the Sophia-G refresh: the model's logits without the labels
        and the positions whose label is not -100, shifted by one for causal LMs.

        Override it for a model whose outputs or batches look different.

        Args:
            model: the unwrapped model (accelerate has wrapped its forward in autocast under
                fp16/bf16).
            inputs: the micro-batch, on the device, with ``labels`` ``(B, T)``.

        Returns:
            ``(B, T', V)`` logits and a ``(B, T')`` bool mask (T' = T − 1 with
            ``shift_labels``, else T).
        """
        label_keys = set(self.label_names) | {"labels", "shift_labels"}
        outputs = model(**{k: v for k, v in inputs.items() if k not in label_keys})
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if logits is None:
            raise ValueError(
                "SophiaTrainer's Hessian refresh needs model outputs with `logits` (a "
                f"*ForCausalLM or *ForMaskedLM model), got {type(outputs).__name__}; override "
                "SophiaTrainer.hessian_logits_and_mask(model, inputs) for other models"
            )
        if "shift_labels" in inputs:  # labels shifted already (context parallelism)
            labels = inputs["shift_labels"]
        elif "labels" in inputs:
            labels = inputs["labels"]
            if self.shift_labels:
                logits, labels = logits[..., :-1, :], labels[..., 1:]
        else:
            raise ValueError(
                "SophiaTrainer's Hessian refresh masks padding with the batch's `labels` "
                f"(-100 = leave out), but the batch has only {sorted(inputs)}; use a collator "
                "that sets labels (e.g. DataCollatorForLanguageModeling)"
            )
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} do not line up with logits of shape "
                f"{tuple(logits.shape)} (shift_labels={self.shift_labels}); pass "
                "shift_labels=False for models whose labels are not shifted"
            )
        return logits, labels.to(logits.device) != -100

    def refresh_hessian(self, inputs: dict[str, Any]) -> bool:
        """One refresh of the optimizer's h on the micro-batch ``inputs``.

        Returns:
            True when the estimate was folded in, False when skipped (not finite under fp16).
        """
        sophia = self._sophia()
        inputs = self._prepare_inputs(inputs)
        scaler = getattr(self.accelerator, "scaler", None)
        # No autocast here: accelerate has wrapped the model's own forward in it (fp16/bf16).
        model = self.model
        if isinstance(sophia, SophiaH):
            def loss_fn() -> Tensor:
                return self.compute_loss(model, inputs)
            folded = hutchinson_refresh(sophia, loss_fn, generator=self._generator("probes"),
                                        scaler=scaler)
        else:
            folded = gauss_newton_refresh(
                sophia, lambda: self.hessian_logits_and_mask(model, inputs),
                generator=self._generator("labels"), scaler=scaler,
                synchronize=self.args.world_size > 1,
            )
        model.zero_grad(set_to_none=True)
        if folded:
            self.hessian_refreshes += 1
        else:
            self.hessian_refreshes_skipped += 1
        return folded

    def _generator(self, purpose: str) -> torch.Generator:
        """The refresh's own random stream: labels differ across ranks, probes do not."""
        if purpose not in self._generators:
            seed = self.args.seed
            if purpose == "labels":
                seed += _LABEL_SEED_OFFSET * (self.args.process_index + 1)
            generator = torch.Generator(device=self.args.device)
            self._generators[purpose] = generator.manual_seed(seed)
        return self._generators[purpose]

    def _refresh_if_due(self) -> None:
        if self._refresh_batch is not None and self._sophia().hessian_due():
            self.refresh_hessian(self._refresh_batch)


class _RefreshAfterStep(TrainerCallback):
    """Calls the trainer's refresh once per optimizer step, when the optimizer says it is due."""

    def __init__(self, trainer: SophiaTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._refresh_if_due()
