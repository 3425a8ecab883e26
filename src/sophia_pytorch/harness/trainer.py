"""The training loop: ``train(config) -> TrainResult``, from Python or as ``sophia train``.

:class:`Trainer` builds everything a run needs once (data, GPT, optimizer, the Hessian
refresh that optimizer needs, lr schedule, run folder), then :meth:`Trainer.fit` repeats
:meth:`Trainer.train_step`: ``grad_accum`` micro-batches forward/backward under autocast,
the mean loss and gradient checked for non-finite values (a bad step is skipped without
touching the optimizer, counted, and aborts the run after ``max_bad_steps`` in a row),
grad-norm clipping, the optimizer step, and Sophia's Hessian refresh when one is owed (see
``.refresh``). Each step's lr is a pure function of the step and the settings
(``.schedule``), set on the groups before the step. Where the run stands is a
:class:`TrainState`.

Every step and every evaluation is one JSON line in ``<run>/log.jsonl``. The time in
``seconds`` counts training only (steps and refreshes, not evaluation or checkpointing), so
wall-clock comparisons between optimizers are fair. Checkpoints (see ``.checkpoint``)
hold everything needed for ``resume`` to continue the same loss curve bit for bit on CPU.

Under ``torchrun`` with ``parallel`` = ddp or fsdp (``sophia_pytorch.harness.distributed``, and
``docs/DISTRIBUTED.md``), each rank reads its own rows of every global batch, gradients are
reduced once per step, and only rank 0 logs, shows progress and writes files; FSDP2 runs keep
model and optimizer state in a ``torch.distributed.checkpoint`` folder beside checkpoint.pt.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _dtensor
from . import distributed
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import SECTIONS, Config, fixed_on_resume, flat_name, flatten, to_dict
from .data import BatchSampler, prepare_data
from .distributed import is_main_process
from .errors import DivergedError, Interrupted, SophiaError, require, writing
from .jsonio import write_json
from .memory import check_memory, estimate_memory, memory_errors_are_user_errors
from .model import GPT, GPTConfig, lm_loss
from .optimizers import build_optimizer, build_refresh
from .rundir import (
    RunLock,
    RunLog,
    make_run_dir,
    prepare_run_dir,
    run_paths,
    set_aside,
    sharded_folder,
)
from .schedule import LRSchedule

__all__ = ["TrainResult", "TrainState", "Trainer", "build_optimizer", "estimate_memory",
           "is_main_process", "lm_loss", "train"]

EVAL_SEED = 20230523  # evaluation windows are the same for every run, seed and optimizer
# 3: no scheduler state (the lr is derived from the step); 2 and 1 still resume.
CHECKPOINT_FORMAT = 3
STABLE_CHECKPOINT = "stable.pt"  # a wsd run's checkpoint at the start of its decay


@dataclass
class TrainResult:
    """What a finished run reports. ``evals`` rows: step, val_loss, seconds, tokens."""

    run_dir: Path
    config: dict[str, Any]
    evals: list[dict[str, float]]
    final_val_loss: float
    steps: int
    train_seconds: float
    tokens: int
    skipped_steps: int
    num_parameters: int
    hessian_seconds: float = 0.0
    final_train_loss: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint beside model, optimizer and RNGs.

    Attributes:
        step: optimizer steps done, skipped ones included.
        tokens: training tokens seen, summed over ranks.
        data_position: index of the next training micro-batch (the sampler is pure).
        train_seconds: time in steps and Hessian refreshes (not evaluation or saving).
        hessian_seconds: the part of ``train_seconds`` spent in Hessian refreshes.
        skipped_steps: steps skipped for a non-finite loss or gradient.
        bad_in_row: the current streak of skipped steps.
        evals: one row per evaluation: step, val_loss, seconds, tokens.
        eval_due: a signal stopped the evaluation due at ``step``: a resumed run does it
            (and the checkpoint after it) before its next step.
    """

    step: int = 0
    tokens: int = 0
    data_position: int = 0
    train_seconds: float = 0.0
    hessian_seconds: float = 0.0
    skipped_steps: int = 0
    bad_in_row: int = 0
    evals: list[dict[str, float]] = field(default_factory=list)
    eval_due: bool = False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):  # checkpoints before eval_due have none due
            setattr(self, f.name, state.get(f.name, False) if f.name == "eval_due"
                    else state[f.name])
        self.evals = [dict(row) for row in self.evals]


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 where asked for (or, for auto, on a GPU that has it)."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def wrap_model(model: nn.Module, config: Config, device: torch.device | None = None) -> nn.Module:
    """The one place the model is wrapped for training: DDP or FSDP2, then torch.compile."""
    model = distributed.wrap_model(model, config.run.parallel,  # type: ignore[arg-type]
                                   device=device, shard_units=getattr(model, "blocks", ()))
    if not config.run.compile:
        return model
    compiled = torch.compile(model)
    assert isinstance(compiled, nn.Module)  # an OptimizedModule; torch's stubs say Callable
    return compiled


@torch.no_grad()
def evaluate(model: nn.Module, batches: BatchSampler, num_batches: int,
             autocast: Callable[[], contextlib.AbstractContextManager],
             stop: Callable[[], bool] | None = None) -> float | None:
    """Mean validation loss (nats/token) over the fixed batches 0..num_batches-1; None when
    ``stop()``, asked before each batch, says to stop (a signal: a long evaluation must not
    outlast a scheduler's grace period)."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for index in range(num_batches):
            if stop is not None and stop():
                return None
            x, y = batches.get(index)
            with autocast():
                total += lm_loss(model(x), y).item()
    finally:
        model.train(was_training)
    return total / num_batches


def _join_job(config: Config) -> distributed.ParallelEnv:
    env = distributed.init_from_env(distributed.resolve_device(config.run.device))
    if (env.world_size > 1 and config.run.parallel == "none") or (
            config.run.parallel != "none" and not distributed.is_initialized()):
        raise SophiaError(
            f"--parallel {config.run.parallel} on {env.world_size} process(es): launch with "
            "`torchrun --nproc-per-node N -m sophia_pytorch.harness train "
            "--parallel ddp|fsdp ...`, or run one process with --parallel none"
        )
    return env


class Trainer:
    """One training run: everything built from ``config`` once, then :meth:`fit`, then
    :meth:`close` (which :func:`train` does for you).

    The run folder is locked from construction to :meth:`close`; a folder holding another
    run is refused unless ``overwrite``.

    Args:
        config: a resolved :class:`~.config.Config` (see ``.config.make_config``).
        resume: a checkpoint file or run folder to continue from; the run keeps writing to
            ``config.run.out_dir`` (set it to the same folder to continue in place). Settings
            that differ from the checkpoint's are applied, or refused (see ``_resume``).
        on_step: called with each step's log record after it is written (tests use it to
            simulate a crash).
        overwrite: replace a run ``config.run.out_dir`` already holds (default False).
    """

    def __init__(self, config: Config, *, resume: str | Path | None = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None,
                 overwrite: bool = False) -> None:
        self.tqdm = require("tqdm").tqdm if config.run.progress else None
        self.config = config
        self.on_step = on_step
        self.env = _join_job(config)
        self.device = self.env.device
        self.run_dir = make_run_dir(config.run.out_dir, config.preset, config.optimizer.name)
        self.lock = RunLock(self.run_dir) if self.env.is_main else None
        self.log: RunLog | None = None
        self._signal: int | None = None  # the first SIGINT/SIGTERM while fitting
        created = not self.run_dir.exists()
        if self.lock is not None:
            self.lock.acquire()
        try:
            if self.env.is_main:
                prepare_run_dir(self.run_dir, overwrite=overwrite,
                                resuming_here=_same_folder(resume, self.run_dir))
            self._build(resume)
        except BaseException:
            self.close(remove_if_empty=created)
            raise

    def _build(self, resume: str | Path | None) -> None:
        config, run, shape = self.config, self.config.run, self.config.model
        LRSchedule.from_config(config).check()  # before the data: tokenizing may take long
        self.dtype = pick_dtype(run.dtype, self.device)
        self.tokens_per_step = config.tokens_per_step * self.env.world_size
        if run.threads:
            torch.set_num_threads(run.threads)
        torch.manual_seed(run.seed)
        if not self.env.is_main:
            distributed.barrier()  # rank 0 builds the token cache, the others then read it
        data = prepare_data(config.data.source, tokenizer=config.data.tokenizer,
                            bpe_vocab_size=config.data.bpe_vocab_size,
                            val_fraction=config.data.val_fraction,
                            cache_dir=run.cache_dir or None, min_tokens=shape.block_size + 1)
        if self.env.is_main:
            distributed.barrier()
        check_memory(config, data.vocab_size, self.device)
        self.model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=shape.block_size,
                                   n_layer=shape.n_layer, n_head=shape.n_head,
                                   n_embd=shape.n_embd, dropout=shape.dropout)).to(self.device)
        self.train_model = wrap_model(self.model, config, self.device)  # before: FSDP2 shards
        self.optimizer = build_optimizer(config, self.model, self.device)
        self.built_hyperparameters = _hyperparameters(self.optimizer)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.schedule = LRSchedule.from_config(config)
        self.refresh = build_refresh(config, self.optimizer, self.train_model,
                                     autocast=self.autocast, device=self.device,
                                     rank=self.env.rank, world_size=self.env.world_size)
        self.train_batches = BatchSampler(data.train, run.batch_size, shape.block_size,
                                          seed=run.seed, rank=self.env.rank,
                                          world_size=self.env.world_size, device=self.device)
        self.val_batches = BatchSampler(data.val, run.batch_size, shape.block_size,
                                        seed=EVAL_SEED, device=self.device)
        self.state = TrainState()
        self.last_train_loss = math.nan
        self.last_saved_step: int | None = None
        branched = False
        if resume is not None:
            self._resume(resume)
            branched = self._set_aside_other_branch(Path(resume))
        self.log = RunLog(self.run_dir, keep_until_step=self.state.step if resume else None,
                          tensorboard=run.tensorboard)
        if self.env.is_main:
            with writing("--out-dir", self.run_dir):
                write_json(self.run_dir / "config.json", to_dict(config))
        if branched:  # checkpoint.pt is this branch's from its first step on
            self.save()

    def close(self, *, remove_if_empty: bool = False) -> None:
        """Close the log and let go of the run folder.

        Args:
            remove_if_empty: also remove the run folder if this run made it and left nothing
                in it but its lock file (default False).
        """
        if self.log is not None:
            self.log.close()
        if self.lock is None:
            return
        self.lock.release()
        if remove_if_empty and self.run_dir.is_dir() and \
                [p.name for p in self.run_dir.iterdir()] == [".lock"]:
            with contextlib.suppress(OSError):
                self.lock.path.unlink()
                self.run_dir.rmdir()
        self.lock = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's dtype (a no-op in float32)."""
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    # ------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train up to ``max_steps``, evaluating and checkpointing on schedule, and always
        evaluating after the last step.

        A SIGINT or SIGTERM stops the run at the next step boundary, or inside an
        evaluation (at its next batch; the resumed run evaluates that step again first): it
        saves a checkpoint there (outside a streak of skipped steps) and raises
        :class:`~.errors.Interrupted` naming the command that continues it; a second signal
        stops at once, unsaved.
        """
        config, run, state = self.config, self.config.run, self.state
        bar = None
        if self.tqdm is not None and self.env.is_main:
            bar = self.tqdm(total=run.max_steps, initial=state.step, dynamic_ncols=True,
                            leave=True, desc=config.optimizer.name)
        self.model.train()
        with self._stopping_on_signals():
            try:
                if state.eval_due:  # a signal stopped it: done now, as the step's schedule
                    self._after_step(owed=True)
                elif state.step == 0 and run.eval_every and not state.evals:
                    self.evaluate()
                while state.step < run.max_steps:
                    self._step_with_schedule(bar)
                    if state.step < run.max_steps and self._stop_requested():  # else: done
                        raise self._interrupted()
            finally:
                if bar is not None:
                    bar.close()
        return self.result()

    def _step_with_schedule(self, bar: Any) -> None:
        """One step, then the evaluation and checkpoint it is due."""
        run, state = self.config.run, self.state
        record = self.train_step()
        assert self.log is not None  # set at the end of __init__
        self.log.write(record)
        if bar is not None:
            _show_progress(bar, record)
        if state.bad_in_row >= run.max_bad_steps:
            raise self._diverged(
                f"training diverged: {state.bad_in_row} steps in a row (up to step "
                f"{state.step}) had a non-finite loss or gradient", lower_lr=True)
        if self.on_step is not None:
            self.on_step(record)
        self._after_step()

    def _after_step(self, *, owed: bool = False) -> None:
        """The evaluation and checkpoints due after step ``state.step``; ``owed``: those of
        a resumed step whose evaluation a signal stopped (then checkpoint.pt is saved
        after it in any case, so that a later resume does not evaluate the step twice)."""
        run, state = self.config.run, self.state
        last = state.step == run.max_steps
        if owed or last or (run.eval_every and state.step % run.eval_every == 0):
            self.evaluate()
        # No checkpoint inside a bad streak: the last one must predate it.
        if owed or last or (run.checkpoint_every and state.step % run.checkpoint_every == 0
                            and not state.bad_in_row):
            self.save()
        if 0 < state.step == self.schedule.decay_start() and not last:
            self.save(STABLE_CHECKPOINT)  # where a longer run can branch off

    # --------------------------------------------------------------- SIGINT, SIGTERM
    @contextlib.contextmanager
    def _stopping_on_signals(self) -> Any:
        """While training, the first SIGINT/SIGTERM asks for a stop at the step boundary
        or the next batch of an evaluation (:meth:`fit` saves there); a second one stops at
        once. Python lets only the main thread set handlers: elsewhere signals keep their
        handlers."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, frame: Any) -> None:
            if self._signal is not None:  # the second: stop now, unsaved
                raise self._interrupted(signum, saved=False)
            self._signal = signum

        previous = {signum: signal.signal(signum, handle)
                    for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_requested(self) -> bool:
        """Whether a signal asked this run to stop; under torchrun, whether one reached any
        rank (all ranks then save and stop at the same step)."""
        asked = float(self._signal is not None)
        return (distributed.mean_over_ranks(asked) if self.env.world_size > 1 else asked) > 0

    def _interrupted(self, signum: int | None = None, *, saved: bool = True) -> Interrupted:
        """Save at this step boundary (``saved``, outside a bad streak), then the error
        saying what was kept and how to continue."""
        signum = signum or self._signal or signal.SIGINT
        name = signal.Signals(signum).name
        state = self.state
        if saved and not state.bad_in_row and self.last_saved_step != state.step:
            self.save()
        if self.last_saved_step is None:
            return Interrupted(
                f"{name} at step {state.step}, before any checkpoint; start again with the "
                f"same command and --overwrite (it replaces {self.run_dir})", signum)
        kept = "saved" if self.last_saved_step == state.step else "not saved; the last " \
            f"checkpoint is at step {self.last_saved_step}"
        if state.eval_due and self.last_saved_step == state.step:
            kept += ", its evaluation stopped: the resumed run does it first"
        return Interrupted(
            f"{name} at step {state.step} ({kept}); continue with "
            f"`sophia train --resume {self.run_dir}`", signum)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step, and any Hessian refresh it owes; returns its log record."""
        state, started = self.state, time.perf_counter()
        self.schedule.apply(self.optimizer, state.step, self.base_lrs)
        lr = self.optimizer.param_groups[0]["lr"]
        micro_batches = [self.train_batches.get(state.data_position + micro)
                         for micro in range(self.config.run.grad_accum)]
        refreshed = self._refresh(micro_batches, key=state.step - 1)  # owed before this step
        loss, grad_norm = self._forward_backward(micro_batches)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        state.skipped_steps += not finite
        state.bad_in_row = 0 if finite else state.bad_in_row + 1
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            refreshed = self._refresh(micro_batches, key=state.step) or refreshed
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        state.train_seconds += time.perf_counter() - started
        state.step += 1
        state.tokens += self.tokens_per_step
        state.data_position += self.config.run.grad_accum
        self.last_train_loss = loss
        return {
            "kind": "step", "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": state.tokens, "seconds": state.train_seconds, "skipped": not finite,
            "hessian": refreshed, "unclipped_fraction": self.refresh.unclipped_fraction(),
        }

    def _forward_backward(self, micro_batches: list) -> tuple[float, float]:
        """Accumulate the step's gradient; return the mean loss and the clipped grad norm."""
        loss_sum = torch.zeros((), device=self.device)
        for index, (x, y) in enumerate(micro_batches):
            # Reduce gradients across ranks on the last micro-batch only.
            with distributed.gradient_sync(self.train_model,
                                           enabled=index == len(micro_batches) - 1):
                with self.autocast():
                    loss = lm_loss(self.train_model(x), y)
                (loss / len(micro_batches)).backward()
            loss_sum += loss.detach()
        mean_loss = distributed.mean_over_ranks(loss_sum) / len(micro_batches)
        grad_clip = self.config.optimizer.grad_clip
        max_norm = grad_clip if grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return mean_loss, distributed.full_tensor(grad_norm).item()  # FSDP2: global norm

    def _refresh(self, micro_batches: list, key: int) -> bool:
        started = time.perf_counter()
        if not self.refresh(micro_batches, key):
            return False
        self.state.hessian_seconds += time.perf_counter() - started
        return True

    # ------------------------------------------------------------- evaluation, saving
    def evaluate(self) -> float:
        """Validation loss on the fixed batches; logged and kept in ``state.evals``.

        Raises:
            Interrupted: a signal came before or during it (see :meth:`fit`): nothing is
                logged, the checkpoint saved here says the evaluation is still due.
        """
        state = self.state
        val_loss = evaluate(self.train_model, self.val_batches, self.config.run.eval_batches,
                            self.autocast, self._stop_requested)
        if val_loss is None:
            state.eval_due = True
            raise self._interrupted()
        state.eval_due = False
        row = {"step": state.step, "val_loss": val_loss, "seconds": state.train_seconds,
               "tokens": state.tokens}
        state.evals.append(row)
        assert self.log is not None  # set at the end of __init__
        self.log.write({"kind": "eval", **row})
        if not math.isfinite(val_loss):
            raise self._diverged(f"the validation loss at step {state.step} is not finite",
                                 lower_lr=True)
        return val_loss

    def save(self, name: str = "checkpoint.pt") -> None:
        """Write checkpoint ``name`` atomically (rank 0); FSDP2 shards go to their own folder
        (a ``stable.pt`` is not written under FSDP2: the shards are the latest save's).

        Args:
            name: the checkpoint's file name in the run folder (default ``"checkpoint.pt"``,
                the one a resume reads; the loop also writes ``stable.pt``).

        Raises:
            DivergedError: the weights or optimizer state are not finite (nothing is written:
                the last checkpoint stays the last finite one).
        """
        if not self._finite():
            raise self._diverged(f"the weights are not finite after step {self.state.step}",
                                 lower_lr=True)
        sharded = None
        if name != "checkpoint.pt" and self.config.run.parallel == "fsdp":
            return
        with writing("--out-dir", self.run_dir):
            if self.config.run.parallel == "fsdp":  # every rank writes its shards anew
                sharded = sharded_folder(self.state.step)
                distributed.save_sharded(self.run_dir / sharded, self.model, self.optimizer)
            if self.env.is_main:
                save_checkpoint({
                    "format": CHECKPOINT_FORMAT, "config": to_dict(self.config),
                    "sharded": sharded, "model": None if sharded else self.model.state_dict(),
                    "optimizer": None if sharded else self.optimizer.state_dict(),
                    "train_state": self.state.state_dict(), "rng": rng_state(),
                }, self.run_dir / name)
                for folder in run_paths(self.run_dir):  # the new one is named now
                    if folder.name.startswith("checkpoint-") and folder.is_dir() \
                            and folder.name != sharded:
                        shutil.rmtree(folder, ignore_errors=True)
        if name == "checkpoint.pt":
            self.last_saved_step = self.state.step

    def _finite(self) -> bool:
        """Whether every weight and optimizer state tensor is finite, on every rank."""
        tensors = [p.detach() for p in self.model.parameters()]
        tensors += [value for per_param in self.optimizer.state.values()
                    for value in per_param.values()
                    if isinstance(value, torch.Tensor) and value.is_floating_point()]
        flags = [(t.to_local() if _dtensor.is_dtensor(t) else t).isfinite().all()
                 for t in tensors]
        local = float(torch.stack([f.to(self.device) for f in flags]).all()) if flags else 1.0
        return distributed.mean_over_ranks(local) == 1.0

    def _diverged(self, problem: str, *, lower_lr: bool = False) -> DivergedError:
        """The error for a run that went non-finite: ``problem``, then a command that
        continues from the last finite checkpoint with half the lr (or starts again)."""
        lr, min_lr = self.config.optimizer.lr, self.config.optimizer.min_lr
        flag = f" --lr {lr / 2:.3g} --min-lr {(min_lr or 0) / 2:.3g}" if lower_lr and lr else ""
        lower = "lower --lr and " if flag else ""
        if self.last_saved_step is None:
            advice = (f"{lower}start again: the same command with --overwrite{flag} (no "
                      "checkpoint was written yet)")
        else:
            advice = (f"{lower}continue from the last finite checkpoint: `sophia train --resume "
                      f"{self.run_dir}{flag}` (step {self.last_saved_step})")
        return DivergedError(f"{problem}; {advice}", result=self.result(), problem=problem)

    def _resume(self, resume: str | Path) -> None:
        """Load a checkpoint; apply the settings this config changes, refuse the rest."""
        checkpoint = load_checkpoint(resume)
        # Formats 1 and 2 also hold a "scheduler" state: not read, the lr is derived.
        missing = [k for k in ("config", "model", "optimizer", "rng") if k not in checkpoint]
        if missing or ("train_state" not in checkpoint and "step" not in checkpoint):
            raise SophiaError(
                f"{str(resume)!r} is not a sophia training checkpoint (it lacks "
                f"{', '.join(missing) or 'train_state'}); point --resume at a run folder or "
                "checkpoint.pt written by `sophia train`"
            )
        _check_compatible(checkpoint["config"], self.config, resume)
        train_state = _train_state(checkpoint, self.config)
        _check_steps_left(train_state["step"], checkpoint["config"], self.config, resume)
        # Optimizer settings the saved config gave, to tell which ones this config changes.
        saved_optimizer = _section(checkpoint["config"], "optimizer")
        reference = _hyperparameters(build_optimizer(
            replace(self.config, optimizer=saved_optimizer), self.model, self.device))
        if checkpoint.get("sharded"):  # an FSDP2 run's: DCP reshards it to this job's ranks
            resume_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
            distributed.load_sharded(resume_dir / checkpoint["sharded"], self.model,
                                     self.optimizer)
        elif self.config.run.parallel == "fsdp":
            raise SophiaError(
                f"checkpoint {str(resume)!r} is not sharded: resume it with --parallel ddp "
                "or none"
            )
        else:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        groups = self.optimizer.param_groups
        for group, new, old in zip(groups, self.built_hyperparameters, reference, strict=True):
            group.pop("initial_lr", None)  # a torch scheduler's, in formats 1 and 2
            for key, value in new.items():  # the lr is the schedule's, set each step
                if key != "lr" and value != old.get(key):  # changed on resume: applied (else
                    group[key] = value  # kept as saved, e.g. an adapted rho)
        old_schedule = LRSchedule.from_config(_saved_config(checkpoint["config"], self.config))
        change = describe_lr_change(train_state["step"], old_schedule, self.schedule,
                                    [group["lr"] for group in reference], self.base_lrs)
        if change and self.env.is_main:
            print(f"note: {change}", file=sys.stderr)
        self.state.load_state_dict(train_state)
        self.last_saved_step = self.state.step
        set_rng_state(checkpoint["rng"])

    def _set_aside_other_branch(self, resume: Path) -> bool:
        """Whether this resume branches off its own folder's history: it resumes a
        checkpoint there (``stable.pt``) older than another one there (``checkpoint.pt`` of
        the run that went on; resuming checkpoint.pt itself continues the run, never
        branches, even past a ``stable.pt``). Then that newer checkpoint (and the record of
        its run) is moved aside with a copy of the log (:func:`~.rundir.set_aside`), so
        that the log keeps only this branch's rows and a later ``--resume <folder>``
        continues this branch, not the other. Every rank learns the answer (all then
        save)."""
        resumed = resume / "checkpoint.pt" if resume.is_dir() else resume
        newer = []
        continuing = resumed.resolve() == (self.run_dir / "checkpoint.pt").resolve()
        if self.env.is_main and _same_folder(resume, self.run_dir) and not continuing:
            for name in ("checkpoint.pt", STABLE_CHECKPOINT):
                path = self.run_dir / name
                if not path.exists() or path.resolve() == resumed.resolve():
                    continue
                try:
                    step = _train_state(load_checkpoint(path), self.config)["step"]
                except (SophiaError, KeyError):  # unreadable: not this branch's either
                    step = None
                if step is None or step > self.state.step:
                    newer.append(name)
        if newer:
            names = [*newer, *(["record.json"] if (self.run_dir / "record.json").exists()
                               else [])]
            with writing("--out-dir", self.run_dir):
                aside = set_aside(self.run_dir, names)
            print(f"note: {resumed.name} (step {self.state.step}) is older than {newer[0]} in "
                  f"{self.run_dir}: a new branch; the other's {', '.join(names)} and log are "
                  f"set aside in {aside}, and `sophia train --resume {self.run_dir}` continues "
                  "this one", file=sys.stderr)
        if self.env.world_size > 1:
            return distributed.mean_over_ranks(float(bool(newer))) > 0
        return bool(newer)

    def result(self) -> TrainResult:
        """The run's evaluations and timings so far."""
        state = self.state
        return TrainResult(
            run_dir=self.run_dir, config=to_dict(self.config), evals=state.evals,
            final_val_loss=state.evals[-1]["val_loss"] if state.evals else math.nan,
            steps=state.step, train_seconds=state.train_seconds, tokens=state.tokens,
            skipped_steps=state.skipped_steps, num_parameters=self.model.num_parameters(),
            hessian_seconds=state.hessian_seconds, final_train_loss=self.last_train_loss,
        )


def train(config: Config, *, resume: str | Path | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None,
          overwrite: bool = False) -> TrainResult:
    """Train a GPT as ``config`` says; return the evaluations and timings.

    Args:
        config: a resolved :class:`~.config.Config` (see ``.config.make_config``).
        resume: a checkpoint file or run folder to continue from; the run keeps writing to
            ``config.run.out_dir`` (set it to the same folder to continue in place).
        on_step: called with each step's log record after it is written (tests use it to
            simulate a crash).
        overwrite: replace a run ``config.run.out_dir`` holds (default: refuse it).

    Raises:
        SophiaError: bad data or settings, an unreadable or mismatched checkpoint, a run
            folder in use or holding another run, a disk that refuses writes, too little
            memory.
        DivergedError: ``max_bad_steps`` non-finite steps in a row, non-finite weights or
            validation loss (its ``result`` holds the run so far).
    """
    with memory_errors_are_user_errors():
        trainer = Trainer(config, resume=resume, on_step=on_step, overwrite=overwrite)
        try:
            return trainer.fit()
        finally:
            trainer.close()


def _show_progress(bar: Any, record: dict[str, Any]) -> None:
    postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}",
               "tok/s": f"{record['tokens'] / max(record['seconds'], 1e-9):.0f}"}
    if record["unclipped_fraction"] is not None:
        postfix["unclipped"] = f"{record['unclipped_fraction']:.2f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


def _train_state(checkpoint: dict[str, Any], config: Config) -> dict[str, Any]:
    """The TrainState a checkpoint holds (format 1 kept it in top-level keys)."""
    if "train_state" in checkpoint:
        return checkpoint["train_state"]
    step = checkpoint["step"]
    return {"step": step, "tokens": step * config.tokens_per_step,
            "data_position": checkpoint["data_position"],
            "train_seconds": checkpoint["train_seconds"],
            "hessian_seconds": checkpoint.get("hessian_seconds", 0.0),
            "skipped_steps": checkpoint["skipped_steps"], "bad_in_row": checkpoint["bad_in_row"],
            "evals": checkpoint["evals"]}


def _check_compatible(saved: dict[str, Any], config: Config, resume: str | Path) -> None:
    """Refuse to resume with another preset, model, data, optimizer, seed or validation set
    than the checkpoint's (every other setting is applied)."""
    mine, theirs = flatten(to_dict(config)), flatten(saved)
    for key in ("preset", *fixed_on_resume()):
        if theirs.get(key) != mine[key]:
            raise SophiaError(
                f"checkpoint {str(resume)!r} was trained with {key}={theirs.get(key)!r}, not "
                f"{mine[key]!r}; drop the --{key.replace('_', '-')} flag to resume it"
            )


def check_config_json(run_dir: str | Path, saved: dict[str, Any], given: set[str]) -> None:
    """Refuse a resume whose run folder's config.json says other settings than the
    checkpoint's (an edit, or a resume that changed settings and was killed before its next
    checkpoint), except those ``given`` again now (flat names): settings change on resume
    through flags or ``--config`` only, and config.json is rewritten, so an edit there would
    otherwise be silently lost. An unreadable or missing config.json is rewritten as usual.
    """
    path = Path(run_dir) / "config.json"
    try:
        found = flatten(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, SophiaError, AttributeError):
        return
    theirs = json.loads(json.dumps(flatten(saved)))
    differ = sorted(k for k in found.keys() | theirs.keys()
                    if k not in given and k != "out_dir" and found.get(k) != theirs.get(k))
    if differ:
        key = differ[0]
        flag = "--" + key.replace("_", "-")
        raise SophiaError(
            f"{path} says {key}={found.get(key)!r} but the checkpoint ran with "
            f"{theirs.get(key)!r} ({len(differ)} such setting(s): {', '.join(differ[:4])}); "
            f"settings change on resume only through flags: add {flag} {found.get(key)} to "
            f"apply it, or {flag} {theirs.get(key)} to keep the checkpoint's"
        )


def _check_steps_left(step: int, saved: dict[str, Any], config: Config,
                      resume: str | Path) -> None:
    """Refuse a ``max_steps`` below the checkpoint's step: nothing would train, and
    config.json would claim a shorter run than the one done."""
    if step > config.run.max_steps:
        saved_steps = flatten(saved).get("max_steps", "?")
        raise SophiaError(
            f"checkpoint {str(resume)!r} is at step {step} (of a {saved_steps}-step run), past "
            f"--max-steps {config.run.max_steps}; give --max-steps above {step} to continue "
            "it, or leave --max-steps out"
        )


def _saved_config(saved: dict[str, Any], config: Config) -> Config:
    """The checkpoint's optimizer settings and max_steps over ``config`` (unvalidated)."""
    max_steps = flatten(saved).get("max_steps", config.run.max_steps)
    return replace(config, optimizer=_section(saved, "optimizer"),
                   run=replace(config.run, max_steps=max_steps))


def describe_lr_change(step: int, old: LRSchedule, new: LRSchedule,
                       old_base_lrs: list[float], new_base_lrs: list[float]) -> str | None:
    """What a resume at ``step`` does to the lr, or None when the new settings give the
    same lr for the steps the old ones still had to run (none shows a jump)."""
    before = old.lr(step, old_base_lrs[0])
    after = new.lr(step, new_base_lrs[0])
    if before == after and old == new and old_base_lrs == new_base_lrs:
        return None
    changed = [f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}"
               for name in ("kind", "warmup_steps", "max_steps", "decay_fraction", "min_lr_ratio")
               if getattr(old, name) != getattr(new, name)]
    if old_base_lrs[0] != new_base_lrs[0]:
        changed.insert(0, f"lr {old_base_lrs[0]:.3g} -> {new_base_lrs[0]:.3g}")
    text = (f"resuming at step {step} with {', '.join(changed)}: the lr there is {after:.3g}, "
            f"where the checkpoint's settings had {before:.3g}")
    if new.kind == "cosine" and new.max_steps != old.max_steps and before != after:
        text += ("; a longer cosine is re-stretched over the whole run, so the lr jumps here "
                 "(to extend a run without a jump, train it with --schedule wsd and resume "
                 "from its stable.pt)")
    elif before == after:
        text += " (no jump here)"
    return text


def _same_folder(resume: str | Path | None, run_dir: Path) -> bool:
    if resume is None:
        return False
    folder = Path(resume) if Path(resume).is_dir() else Path(resume).parent
    return folder.resolve() == run_dir.resolve()


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k not in ("params", "initial_lr")}
            for group in optimizer.param_groups]


def _section(saved: dict[str, Any], name: str) -> Any:
    """Section ``name`` of a saved config (nested or flat), unvalidated."""
    cls = SECTIONS[name]
    values = flatten(saved)
    return cls(**{f.name: values[flat] for f in fields(cls)
                  if (flat := flat_name(f)) in values})
