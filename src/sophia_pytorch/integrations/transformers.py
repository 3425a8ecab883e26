"""``SophiaTrainer``: Hugging Face's ``transformers.Trainer`` with Sophia's Hessian refresh.

    >>> trainer = SophiaTrainer(model=model, args=args, train_dataset=data,
    ...                         sophia_kwargs={"rho": 0.05, "refresh_every": 10})
    >>> trainer.train()

Needs ``pip install 'sophia-pytorch[transformers]'`` (transformers ≥ 4.46, accelerate).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..optimizer import SophiaG, SophiaH
from ..refresh import (
    LogitsAndMask,
    SampledLoss,
    find_sophia,
    gauss_newton_bartlett,
    hutchinson,
    refresh_generator,
    sampled_loss,
)

__all__ = ["SophiaTrainer", "head_of"]

_RESERVED = ("lr", "weight_decay")
Head = Literal["causal_lm", "masked_lm", "token_classification", "sequence_classification"]
_HEAD_MAPPINGS: tuple[tuple[Head, str, tuple[str, ...]], ...] = (
    ("causal_lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("ForCausalLM", "LMHeadModel")),
    ("masked_lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("ForMaskedLM",)),
    ("token_classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
     ("ForTokenClassification",)),
    ("sequence_classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
     ("ForSequenceClassification",)),
)
_PROBLEM_LOSSES = {"regression": "gaussian", "single_label_classification": "cross_entropy",
                   "multi_label_classification": "bernoulli"}


def head_of(model: nn.Module) -> Head | None:
    """The task of a Hugging Face model's head, from its class name: ``"causal_lm"`` (labels
    shifted by the model), ``"masked_lm"``, ``"token_classification"``,
    ``"sequence_classification"``, or None for a class it does not know.

    Args:
        model: the Hugging Face model (its class is read, against transformers' auto
            mappings, then by its name's suffix).
    """
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for head, mapping, suffixes in _HEAD_MAPPINGS:
        names = getattr(modeling_auto, mapping, {}).values()
        if name in names or name.endswith(suffixes):
            return head
    return None


class SophiaTrainer(Trainer):
    """A ``transformers.Trainer`` that refreshes SophiaG's or SophiaH's Hessian estimate.

    After every optimizer step whose count is a multiple of ``refresh_every`` (when
    ``optimizer.hessian_due()``), it runs one refresh on the last micro-batch of that step:

    * SophiaG: forward without the labels, targets drawn from the model's own predictive
      distribution — the softmax, a Gaussian or a Bernoulli, as the model's loss is (below) —
      at the positions whose (shifted) label is not -100, backward, ``update_hessian(scale=B)``
      with B the positions sampled over all ranks;
    * SophiaH: ``update_hessian(closure)`` with the model's own loss on the batch (a double
      backward, under the math attention backend).

    With ``refresh_at_start=True`` on the optimizer, it also refreshes on the first
    micro-batch, before the first step.

    Args:
        *args: the positional arguments of ``transformers.Trainer`` (``model``, ``args``, …).
        sophia_kwargs: further keywords of the SophiaG it builds (``rho``, ``betas``,
            ``refresh_every``, …); not ``lr`` or ``weight_decay``, which come from ``args``.
            Default None: SophiaG's own defaults.
        shift_labels: whether the label at position t is the token predicted at t − 1, so
            that the refresh pairs ``logits[:, :-1]`` with ``labels[:, 1:]``. Only ever
            applied to token-level logits ``(B, T, V)`` with T > 1, never to ``(B, C)``.
            Default None: from the model's class (:func:`head_of`) — shifted for
            ``*ForCausalLM``, not for ``*ForMaskedLM``, ``*ForTokenClassification`` or
            ``*ForSequenceClassification``; another model with token-level logits must say.
        hessian_loss: the likelihood whose Gauss-Newton diagonal the refresh estimates:
            ``"cross_entropy"`` (softmax), ``"gaussian"`` (MSE, σ² = 1), ``"bernoulli"``
            (BCE, multi-label) or a callable (:class:`sophia_pytorch.refresh.SampledLoss`).
            Default None: the model's own — ``config.problem_type`` (``regression`` →
            gaussian, ``single_label_classification`` → cross_entropy,
            ``multi_label_classification`` → bernoulli; unset, it is inferred as the model
            does: one label → regression, integer labels → single-label, else multi-label),
            cross_entropy for language-model and token-classification heads.
        **kwargs: the keyword arguments of ``transformers.Trainer``. Pass
            ``optimizers=(SophiaG(...), scheduler or None)`` — or SophiaH — or no optimizer:
            then a SophiaG is built with ``lr=args.learning_rate``,
            ``weight_decay=args.weight_decay`` (0 for biases and norms, as the Trainer does for
            AdamW) and ``sophia_kwargs``.

    How it hooks in: ``training_step`` keeps a reference to its micro-batch, and a
    ``TrainerCallback.on_step_end`` does the refresh. ``on_step_end`` runs once per optimizer
    step, after ``optimizer.step()`` and ``zero_grad`` and outside accelerate's ``no_sync``,
    in every Trainer from 4.46 to 5.x; ``training_step`` runs once per micro-batch, before the
    step, sometimes inside ``no_sync``, and its signature changed across versions (it takes and
    passes on ``*args, **kwargs``). The refresh runs the unwrapped model and averages its
    gradients over ranks itself (:mod:`sophia_pytorch.refresh`), so DDP's reducer
    plays no part. A step that the GradScaler skipped does not advance the optimizer's count,
    so it triggers no second refresh. The label generator is seeded with ``args.seed`` and the
    rank, the probe generator with ``args.seed`` (the same probes on every rank), both keyed by
    the optimizer step (:func:`sophia_pytorch.refresh.refresh_generator`), so a resumed run
    draws what an unbroken one would.

    Supported: one process, DDP (``torchrun``), fp32, fp16 with accelerate's GradScaler, bf16.
    Not supported: DeepSpeed, FSDP (the refresh would bypass their gradient handling).
    """

    def __init__(
        self,
        *args: Any,
        sophia_kwargs: Mapping[str, Any] | None = None,
        shift_labels: bool | None = None,
        hessian_loss: str | SampledLoss | None = None,
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
        if hessian_loss is not None:
            sampled_loss(hessian_loss)  # an unknown name fails here, not at the first refresh
        self.shift_labels = shift_labels
        self.hessian_loss = hessian_loss
        self.hessian_refreshes = 0
        """Refreshes folded into h so far (not counting skipped ones)."""
        self.hessian_refreshes_skipped = 0
        """Refreshes skipped because a gradient was not finite (fp16)."""
        self._refresh_batch: dict[str, Any] | None = None
        self._start_refresh_tried = False
        self.add_callback(_RefreshAfterStep(self))

    # ------------------------------------------------------------------ the optimizer
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Build SophiaG from ``args`` and ``sophia_kwargs`` unless an optimizer was passed."""
        if self.optimizer is None:
            model = self._the_model()
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
        """``(logits, mask)`` of the Sophia-G refresh: what the model's own loss sees.

        The model's outputs without the labels; token-level LM logits shifted by one for
        causal LMs; the positions whose label is not -100 (for a softmax; every row for a
        Gaussian or Bernoulli head; the sampled loss is :meth:`hessian_loss_of`'s).
        Override it for a model whose outputs or batches look different.

        Args:
            model: the unwrapped model (accelerate has wrapped its forward in autocast under
                fp16/bf16).
            inputs: the micro-batch, on the device, with ``labels``.

        Returns:
            ``(..., C)`` logits and a bool mask of their leading shape, or None.
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
        head = head_of(model)
        token_level = logits.dim() == 3 and logits.shape[1] > 1
        labels = inputs.get("shift_labels", inputs.get("labels"))
        chosen = self._loss_for(model, head, labels)
        if "shift_labels" not in inputs and labels is not None and token_level and self._shifts(
                head, logits, labels):
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        if chosen != "cross_entropy" and not callable(chosen):
            return logits, None  # Gaussian, Bernoulli: every row, as the model's loss
        if labels is None:
            if head == "sequence_classification":
                return logits, None
            raise ValueError(
                "SophiaTrainer's Hessian refresh masks padding with the batch's `labels` "
                f"(-100 = leave out), but the batch has only {sorted(inputs)}; use a collator "
                "that sets labels (e.g. DataCollatorForLanguageModeling)"
            )
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} do not line up with logits of shape "
                f"{tuple(logits.shape)} (model head {head or type(model).__name__!r}, "
                f"shift_labels={self.shift_labels}); pass shift_labels= or hessian_loss= to "
                "SophiaTrainer, or override hessian_logits_and_mask"
            )
        return logits, labels.to(logits.device) != -100

    def _shifts(self, head: Head | None, logits: Tensor, labels: Tensor) -> bool:
        """Whether token-level ``logits`` pair with labels one position later."""
        if self.shift_labels is not None:
            return self.shift_labels
        if head is not None:
            return head == "causal_lm"
        raise ValueError(
            f"SophiaTrainer cannot tell whether the labels of a {type(self.model).__name__} "
            f"(logits {tuple(logits.shape)}) are shifted: pass shift_labels=True for a causal "
            "LM (label t is predicted at t − 1) or shift_labels=False"
        )

    def _loss_for(self, model: nn.Module, head: Head | None,
                  labels: Tensor | None) -> str | SampledLoss:
        """The sampled loss of the model's likelihood (see ``hessian_loss``)."""
        if self.hessian_loss is not None:
            return self.hessian_loss
        if head in ("causal_lm", "masked_lm", "token_classification"):
            return "cross_entropy"
        config = getattr(model, "config", None)
        problem = getattr(config, "problem_type", None)
        if problem is None and head == "sequence_classification":
            if getattr(config, "num_labels", None) == 1:
                problem = "regression"
            elif labels is not None and not labels.is_floating_point():
                problem = "single_label_classification"
            elif labels is not None:
                problem = "multi_label_classification"
        if problem is None and head is None:
            return "cross_entropy"
        if problem not in _PROBLEM_LOSSES:
            raise ValueError(
                f"SophiaTrainer cannot tell the likelihood of a {type(model).__name__} "
                f"(problem_type={problem!r}); pass hessian_loss='cross_entropy', 'gaussian', "
                "'bernoulli' or a callable"
            )
        return _PROBLEM_LOSSES[problem]

    def hessian_loss_of(self, model: nn.Module, inputs: dict[str, Any]) -> str | SampledLoss:
        """The sampled loss a refresh on ``inputs`` uses: ``hessian_loss``, or the one the
        model's head and labels call for (a pure function of them: nothing is remembered
        between calls).

        Args:
            model: the unwrapped model; its class and ``config.problem_type`` tell the head.
            inputs: the micro-batch; its ``labels`` (``(B, T)`` or ``(B,)``) tell a
                classifier's labels from a regression's.

        Returns:
            a name of ``sophia_pytorch.refresh.SAMPLED_LOSSES`` or the ``hessian_loss``
            callable.
        """
        labels = inputs.get("shift_labels", inputs.get("labels"))
        return self._loss_for(model, head_of(model), labels)

    def refresh_hessian(self, inputs: dict[str, Any]) -> bool:
        """One refresh of the optimizer's h on the micro-batch ``inputs``.

        Args:
            inputs: a micro-batch as the Trainer's data collator gives it to ``training_step``
                (``input_ids`` ``(B, T)``, ``attention_mask``, ``labels`` of shape ``(B, T)``
                or ``(B,)``, …); moved to the device here.

        Returns:
            True when the estimate was folded in, False when skipped (not finite under fp16).
        """
        sophia = self._sophia()
        inputs = self._prepare_inputs(inputs)
        scaler = getattr(self.accelerator, "scaler", None)
        # No autocast here: accelerate has wrapped the model's own forward in it (fp16/bf16).
        model = self._the_model()
        if isinstance(sophia, SophiaH):
            def loss_fn() -> Tensor:
                # transformers annotates compute_loss without an overload on return_outputs:
                # with return_outputs=False (the default) it returns the loss tensor alone.
                return self.compute_loss(model, inputs)  # type: ignore[return-value]
            folded = hutchinson(sophia, loss_fn, generator=self._generator(sophia, 0),
                                scaler=scaler)
        else:
            folded = gauss_newton_bartlett(
                sophia, [lambda: self.hessian_logits_and_mask(model, inputs)],
                loss=sampled_loss(self.hessian_loss_of(model, inputs)), scaler=scaler,
                synchronize=self.args.world_size > 1,
                generator=self._generator(sophia, self.args.process_index),
            )
        model.zero_grad(set_to_none=True)
        if folded:
            self.hessian_refreshes += 1
        else:
            self.hessian_refreshes_skipped += 1
        return folded

    def _the_model(self) -> torch.nn.Module:
        """``self.model``, which transformers types as optional (a ``model_init`` trainer sets
        it when training starts)."""
        if self.model is None:
            raise RuntimeError(
                "SophiaTrainer has no model yet: pass model= (or model_init=, which sets it when "
                "train() starts) before creating the optimizer or refreshing the Hessian"
            )
        return self.model

    def _generator(self, sophia: SophiaG | SophiaH, rank: int) -> torch.Generator:
        """This refresh's random stream: keyed by the step; labels differ across ranks (the
        rank given), probes do not (rank 0)."""
        return refresh_generator(self.args.seed, sophia.steps_taken(), rank=rank,
                                 device=self.args.device)

    def _refresh_if_due(self) -> None:
        if self._refresh_batch is not None and self._sophia().hessian_due():
            self.refresh_hessian(self._refresh_batch)


class _RefreshAfterStep(TrainerCallback):
    """Calls the trainer's refresh once per optimizer step, when the optimizer says it is due."""

    def __init__(self, trainer: SophiaTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._refresh_if_due()
