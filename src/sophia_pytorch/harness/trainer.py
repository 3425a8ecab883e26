"""The training loop: ``train(config) -> TrainResult``, from Python or as ``sophia train``.

One optimizer step: ``grad_accum`` micro-batches forward/backward under autocast, the mean
loss and gradient checked for non-finite values (a bad step is skipped without touching the
optimizer, counted, and aborts the run after ``max_bad_steps`` in a row), grad-norm
clipping, the optimizer step, the lr schedule. Then, for Sophia, every ``hessian_every``
steps, the Hessian refresh on ``hessian_fraction`` of the same batch:

- Sophia-G: labels sampled from the model's softmax (``sampled_cross_entropy``), the mean
  sampled loss over B positions back-propagated, ``update_hessian(scale=B)``;
- Sophia-H: ``update_hessian(closure)`` with a closure that recomputes the loss.

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
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .baselines.lion import Lion
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, to_dict
from .data import BatchSampler, prepare_data
from .errors import SophiaError, require
from .model import GPT, GPTConfig
from .schedule import WarmupCosine

__all__ = ["TrainResult", "build_optimizer", "is_main_process", "lm_loss", "train"]

EVAL_SEED = 20230523  # evaluation windows are the same for every run, seed and optimizer
_MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "tokenizer", "bpe_vocab_size", "data")


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


def is_main_process() -> bool:
    """True on rank 0 of a data-parallel job, and always without one: it writes files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats; logits (B, T, V), targets (B, T) long."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SophiaError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SophiaError("device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 where asked for (or, for auto, on a GPU that has it)."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_optimizer(config: Config, model: nn.Module,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer``, decaying only matrices and embeddings."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        fused = device is not None and device.type == "cuda"
        return torch.optim.AdamW(groups, **kwargs, fused=fused or None)
    if config.optimizer == "lion":
        return Lion(groups, **kwargs)
    import sophia_pytorch

    cls = {"sophiag": sophia_pytorch.SophiaG, "sophiah": sophia_pytorch.SophiaH}[config.optimizer]
    return cls(groups, **kwargs, rho=config.rho, refresh_every=config.hessian_every)


def wrap_model(model: nn.Module, config: Config, device: torch.device | None = None) -> nn.Module:
    """The one place the model is wrapped for training: DDP or FSDP2, then torch.compile."""
    model = distributed.wrap_model(model, config.parallel, device=device,  # type: ignore[arg-type]
                                shard_units=getattr(model, "blocks", ()))
    return torch.compile(model) if config.compile else model


def make_run_dir(config: Config) -> Path:
    if config.out_dir:
        return Path(config.out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.preset}-{config.optimizer}-{stamp}"


class RunLog:
    """``log.jsonl`` (one JSON object a line) and, optionally, TensorBoard scalars."""

    def __init__(self, run_dir: Path, *, keep_until_step: int | None, tensorboard: bool) -> None:
        self.path = run_dir / "log.jsonl"
        self.enabled = is_main_process()
        self.writer = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.exists():
            # A resumed run drops what the crashed one logged after its last checkpoint.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_until_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif keep_until_step is None:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SophiaError(
                    "--tensorboard needs the tensorboard package; run: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def evaluate(model: nn.Module, batches: BatchSampler, num_batches: int,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Mean validation loss (nats/token) over the fixed batches 0..num_batches-1."""
    was_training = model.training
    model.eval()
    total = 0.0
    for index in range(num_batches):
        x, y = batches.get(index)
        with autocast():
            total += lm_loss(model(x), y).item()
    model.train(was_training)
    return total / num_batches


def _refresh_hessian(optimizer: torch.optim.Optimizer, model: nn.Module, micro_batches: list,
                     config: Config, generator: torch.Generator,
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Fold a fresh Hessian estimate from ``hessian_fraction`` of this step's batch into h."""
    import sophia_pytorch

    rows = max(1, round(config.hessian_fraction * config.batch_size * config.grad_accum))
    if isinstance(optimizer, sophia_pytorch.SophiaH):
        x, y = micro_batches[0]
        x, y = x[:rows], y[:rows]  # Hutchinson: one micro-batch at most, double backward

        def closure() -> Tensor:
            with autocast():
                return lm_loss(model(x), y)

        optimizer.update_hessian(closure, generator=generator)
        return
    total_samples = rows * config.block_size
    remaining = rows
    for x, _ in micro_batches:
        if remaining <= 0:
            break
        take = min(remaining, x.shape[0])
        remaining -= take
        with autocast():
            logits = model(x[:take])
        loss, num_samples = sophia_pytorch.sampled_cross_entropy(logits, generator=generator)
        # Weighted so p.grad is the gradient of the mean over all `total_samples` positions.
        (loss * (num_samples / total_samples)).backward()
    # Under DDP/FSDP2 p.grad is the mean over the ranks' (equal) means: B counts every rank.
    optimizer.update_hessian(scale=distributed.global_num_samples(total_samples))
    optimizer.zero_grad(set_to_none=True)


def train(config: Config, *, resume: str | Path | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train a GPT as ``config`` says; return the evaluations and timings.

    Args:
        config: a resolved :class:`~.config.Config` (see ``.config.make_config``).
        resume: a checkpoint file or run folder to continue from; the run keeps writing to
            ``config.out_dir`` (set it to the same folder to continue in place).
        on_step: called with each step's log record after it is written (tests use it to
            simulate a crash).

    Raises:
        SophiaError: bad data, an unreadable or mismatched checkpoint, or a run that produced
            ``max_bad_steps`` non-finite steps in a row.
    """
    tqdm = require("tqdm").tqdm if config.progress else None
    env = distributed.init_from_env(pick_device(config.device))
    if (env.world_size > 1 and config.parallel == "none") or (
            config.parallel != "none" and not distributed.is_initialized()):
        raise SophiaError(
            f"--parallel {config.parallel} on {env.world_size} process(es): launch with "
            "`torchrun --nproc-per-node N -m sophia_pytorch.harness train "
            "--parallel ddp|fsdp ...`, or run "
            "one process with --parallel none"
        )
    device = env.device
    tokens_per_step = config.tokens_per_step * env.world_size
    dtype = pick_dtype(config.dtype, device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    if not env.is_main:
        distributed.barrier()  # rank 0 builds the token cache, the others then read it
    data = prepare_data(config.data, tokenizer=config.tokenizer,
                        bpe_vocab_size=config.bpe_vocab_size, val_fraction=config.val_fraction,
                        cache_dir=config.cache_dir or None, min_tokens=config.block_size + 1)
    if env.is_main:
        distributed.barrier()
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=config.block_size,
                          n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                          dropout=config.dropout)).to(device)
    train_model = wrap_model(model, config, device)  # before the optimizer: FSDP2 shards
    optimizer = build_optimizer(config, model, device)
    min_lr_ratio = config.min_lr / config.lr if config.lr else 1.0
    scheduler = WarmupCosine(optimizer, min_lr_ratio=min_lr_ratio,
                             warmup_steps=config.warmup_steps, max_steps=config.max_steps)
    train_batches = BatchSampler(data.train, config.batch_size, config.block_size,
                                 seed=config.seed, rank=env.rank, world_size=env.world_size,
                                 device=device)
    val_batches = BatchSampler(data.val, config.batch_size, config.block_size, seed=EVAL_SEED,
                               device=device)
    run_dir = make_run_dir(config)
    checkpoint_path = run_dir / "checkpoint.pt"

    step, train_seconds, hessian_seconds, skipped, bad_in_row = 0, 0.0, 0.0, 0, 0
    evals: list[dict[str, float]] = []
    if resume is not None:
        state = load_checkpoint(resume)
        _check_compatible(state["config"], config, resume)
        if state.get("sharded"):  # an FSDP2 run's: DCP reshards it to this job's ranks
            resume_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
            distributed.load_sharded(resume_dir / state["sharded"], model, optimizer)
        elif config.parallel == "fsdp":
            raise SophiaError(
                f"checkpoint {str(resume)!r} is not sharded: resume it with --parallel ddp "
                "or none"
            )
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The schedule follows the current config, so `--resume --max-steps N` extends it.
        scheduler.min_lr_ratio, scheduler.warmup_steps, scheduler.max_steps = (
            min_lr_ratio, config.warmup_steps, config.max_steps)
        for group, group_lr in zip(optimizer.param_groups, scheduler.get_lr(), strict=True):
            group["lr"] = group_lr
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        step, train_seconds = state["step"], state["train_seconds"]
        hessian_seconds = state.get("hessian_seconds", 0.0)
        skipped, bad_in_row, evals = state["skipped_steps"], state["bad_in_row"], state["evals"]
        set_rng_state(state["rng"])
    log = RunLog(run_dir, keep_until_step=step if resume is not None else None,
                 tensorboard=config.tensorboard)
    if is_main_process():
        (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=1) + "\n")

    def run_eval(done: int) -> None:
        val_loss = evaluate(train_model, val_batches, config.eval_batches, autocast)
        record = {"kind": "eval", "step": done, "val_loss": val_loss, "seconds": train_seconds,
                  "tokens": done * tokens_per_step}
        evals.append({k: v for k, v in record.items() if k != "kind"})
        log.write(record)

    def save(done: int) -> None:
        sharded = None
        if config.parallel == "fsdp":  # every rank writes its shards to a new folder
            sharded = f"checkpoint-{done:08d}"
            distributed.save_sharded(run_dir / sharded, model, optimizer)
        if not is_main_process():
            return
        save_checkpoint({
            "format": 1, "config": to_dict(config), "sharded": sharded,
            "model": None if sharded else model.state_dict(),
            "optimizer": None if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": done, "data_position": done * config.grad_accum,
            "train_seconds": train_seconds, "hessian_seconds": hessian_seconds,
            "skipped_steps": skipped, "bad_in_row": bad_in_row, "evals": evals,
            "rng": rng_state(),
        }, checkpoint_path)
        for folder in run_dir.glob("checkpoint-*"):  # checkpoint.pt now names the new one
            if folder.name != sharded:
                shutil.rmtree(folder, ignore_errors=True)

    if step == 0 and config.eval_every:
        run_eval(0)
    bar = tqdm(total=config.max_steps, initial=step, dynamic_ncols=True, leave=True,
               desc=config.optimizer) if tqdm and env.is_main else None
    train_loss = math.nan
    model.train()
    try:
        while step < config.max_steps:
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            micro_batches = [train_batches.get(step * config.grad_accum + micro)
                             for micro in range(config.grad_accum)]
            loss_sum = torch.zeros((), device=device)
            for index, (x, y) in enumerate(micro_batches):
                # Reduce gradients across ranks on the last micro-batch only.
                with distributed.gradient_sync(train_model, enabled=index == config.grad_accum - 1):
                    with autocast():
                        loss = lm_loss(train_model(x), y)
                    (loss / config.grad_accum).backward()
                loss_sum += loss.detach()
            train_loss = distributed.mean_over_ranks(loss_sum) / config.grad_accum
            max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            grad_norm = distributed.full_tensor(grad_norm).item()  # FSDP2: global, not my shard's
            finite = math.isfinite(train_loss) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                bad_in_row = 0
            else:
                skipped += 1
                bad_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # Skipped steps are deliberate; torch warns when no optimizer.step() came first.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
            refreshed = False
            hessian_due = getattr(optimizer, "hessian_due", None)
            if finite and hessian_due is not None and hessian_due():
                refresh_started = time.perf_counter()
                # SophiaH's probes must agree across ranks; SophiaG's labels should not.
                rank = 0 if config.optimizer == "sophiah" else env.rank
                generator = torch.Generator(device).manual_seed(
                    ((config.seed * 1_000_003 + step) * env.world_size + rank) % 2**32)
                _refresh_hessian(optimizer, train_model, micro_batches, config, generator,
                                 autocast)
                refreshed = True
                hessian_seconds += time.perf_counter() - refresh_started
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - started
            step += 1
            unclipped = getattr(optimizer, "unclipped_fraction", None)
            record = {
                "kind": "step", "step": step, "loss": train_loss, "lr": lr,
                "grad_norm": grad_norm, "tokens": step * tokens_per_step,
                "seconds": train_seconds, "skipped": not finite, "hessian": refreshed,
                "unclipped_fraction": unclipped() if unclipped is not None else None,
            }
            log.write(record)
            if bar is not None:
                postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2e}",
                           "tok/s": f"{record['tokens'] / max(train_seconds, 1e-9):.0f}"}
                if record["unclipped_fraction"] is not None:
                    postfix["unclipped"] = f"{record['unclipped_fraction']:.2f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
            if bad_in_row >= config.max_bad_steps:
                raise SophiaError(
                    f"training diverged: {bad_in_row} steps in a row (up to step {step}) had a "
                    "non-finite loss or gradient; lower --lr or raise --warmup-steps, then "
                    "--resume from the last checkpoint"
                )
            if on_step is not None:
                on_step(record)
            if config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
                run_eval(step)
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or \
                    step == config.max_steps:
                save(step)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    final_val = evals[-1]["val_loss"] if evals else math.nan
    return TrainResult(
        run_dir=run_dir, config=to_dict(config), evals=evals, final_val_loss=final_val,
        steps=step, train_seconds=train_seconds, tokens=step * tokens_per_step,
        skipped_steps=skipped, num_parameters=model.num_parameters(),
        hessian_seconds=hessian_seconds, final_train_loss=train_loss,
    )


def _check_compatible(saved: dict[str, Any], config: Config, resume: str | Path) -> None:
    for key in (*_MODEL_KEYS, "optimizer"):
        if saved.get(key) != getattr(config, key):
            raise SophiaError(
                f"checkpoint {str(resume)!r} was trained with {key}={saved.get(key)!r}, not "
                f"{getattr(config, key)!r}; drop the --{key.replace('_', '-')} flag to resume it"
            )
