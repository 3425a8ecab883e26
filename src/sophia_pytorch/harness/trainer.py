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
hold everything needed for ``resume`` to continue the same loss curve bit for bit on CPU;
how a resume reads, checks and applies one is ``.resume``'s.

Under ``torchrun`` with ``parallel`` = ddp or fsdp (``sophia_pytorch.harness.distributed``, and
``docs/DISTRIBUTED.md``), each rank reads its own rows of every global batch, gradients are
reduced once per step, and only rank 0 logs, shows progress and writes files; FSDP2 runs keep
model and optimizer state in a ``torch.distributed.checkpoint`` folder beside checkpoint.pt.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _dtensor
from . import distributed
from .checkpoint import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    STABLE_CHECKPOINT,
    rng_state,
    save_checkpoint,
)
from .config import Config, to_dict
from .data import BatchSampler, prepare_data
from .distributed import is_main_process
from .errors import DivergedError, Interrupted, SophiaError, require, writing
from .jsonio import write_json
from .memory import check_memory, estimate_memory, memory_errors_are_user_errors
from .model import GPT, GPTConfig, lm_loss
from .optimizers import build_optimizer, build_refresh
from .resume import ResumePoint, branch_off, restore, resume_folder
from .rundir import RunLock, RunLog, make_run_dir, prepare_run_dir, run_paths, sharded_folder
from .runstate import TrainResult, TrainState
from .schedule import LRSchedule

__all__ = ["TrainResult", "TrainState", "Trainer", "build_optimizer", "estimate_memory",
           "is_main_process", "lm_loss", "train"]

EVAL_SEED = 20230523  # evaluation windows are the same for every run, seed and optimizer


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 where asked for (or, for auto, on a GPU that has it)."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def prepare_model(model: nn.Module, config: Config,
                  device: torch.device | None = None) -> nn.Module:
    """The model the loop calls: ``model`` wrapped for ``config.run.parallel`` (DDP or FSDP2,
    :func:`.distributed.wrap_model`), then compiled when ``config.run.compile``."""
    model = distributed.wrap_model(model, config.run.parallel,  # type: ignore[arg-type]
                                   device=device, shard_units=getattr(model, "blocks", ()))
    if not config.run.compile:
        return model
    compiled = torch.compile(model)
    assert isinstance(compiled, nn.Module)  # an OptimizedModule; torch's stubs say Callable
    return compiled


@torch.no_grad()
def validation_loss(model: nn.Module, batches: BatchSampler, num_batches: int,
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
        resume: a checkpoint file or run folder to continue from (or one already read, a
            :class:`~.resume.ResumePoint`); the run keeps writing to ``config.run.out_dir``
            (set it to the same folder to continue in place). Settings that differ from the
            checkpoint's are applied, or refused (see :func:`.resume.restore`).
        on_step: called with each step's log record after it is written (tests use it to
            simulate a crash).
        overwrite: replace a run ``config.run.out_dir`` already holds (default False).
    """

    def __init__(self, config: Config, *, resume: str | Path | ResumePoint | None = None,
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
                here = resume is not None and \
                    resume_folder(resume).resolve() == self.run_dir.resolve()
                prepare_run_dir(self.run_dir, overwrite=overwrite, resuming_here=here)
            self._build(resume)
        except BaseException:
            self.close(remove_if_empty=created)
            raise

    def _build(self, resume: str | Path | ResumePoint | None) -> None:
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
        self.train_model = prepare_model(self.model, config, self.device)  # FSDP2 shards first
        self.optimizer = build_optimizer(config, self.model, self.device)
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
            point = ResumePoint.of(resume)  # the one read of the checkpoint
            self.state.load_state_dict(restore(point, config, self.model, self.optimizer,
                                               schedule=self.schedule,
                                               announce=self.env.is_main))
            self.last_saved_step = self.state.step
            branched = branch_off(point, self.run_dir, self.state.step, config,
                                  is_main=self.env.is_main, world_size=self.env.world_size)
        self.log = RunLog(self.run_dir, keep_until_step=None if resume is None else self.state.step,
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
        val_loss = validation_loss(self.train_model, self.val_batches, self.config.run.eval_batches,
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

    def save(self, name: str = CHECKPOINT) -> None:
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
        if name != CHECKPOINT and self.config.run.parallel == "fsdp":
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
        if name == CHECKPOINT:
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


def train(config: Config, *, resume: str | Path | ResumePoint | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None,
          overwrite: bool = False) -> TrainResult:
    """Train a GPT as ``config`` says; return the evaluations and timings.

    Args:
        config: a resolved :class:`~.config.Config` (see ``.config.make_config``).
        resume: a checkpoint file or run folder to continue from (or a
            :class:`~.resume.ResumePoint` read from one); the run keeps writing to
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
