"""Run configuration: one flat dataclass, named presets, TOML files and command-line overrides.

Precedence, lowest first: the preset's values, then a TOML file (flat ``key = value`` pairs
named like the fields below), then ``--flag value`` overrides. Optimizer hyperparameters left
unset (``None``) are filled from the preset's table for the chosen optimizer by
:func:`resolve`, so ``--optimizer adamw`` picks AdamW's tuned lr without further flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from .errors import SophiaError

__all__ = [
    "OPTIMIZERS",
    "PRESETS",
    "Config",
    "OptimizerHparams",
    "Preset",
    "load_toml",
    "make_config",
    "resolve",
]

OPTIMIZERS = ("sophiag", "sophiah", "adamw", "lion")
DTYPES = ("auto", "float32", "bfloat16")
TOKENIZERS = ("byte", "bpe")
PARALLEL_MODES = ("none", "ddp", "fsdp")  # sophia_pytorch.harness.distributed.wrap_model


@dataclass(frozen=True)
class OptimizerHparams:
    """One optimizer's tuned hyperparameters in a preset (``rho`` is used by Sophia only)."""

    lr: float
    min_lr: float
    betas: tuple[float, float]
    weight_decay: float
    rho: float = 0.0


@dataclass
class Config:
    """Everything one training run needs. Units: steps are optimizer steps, batch sizes rows.

    One optimizer step sees ``batch_size * grad_accum`` sequences of ``block_size`` tokens.
    """

    preset: str = "tiny"
    # Model (a GPT; see sophia_pytorch.harness.model).
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    # Data: "default" (Shakespeare + King James Bible), "shakespeare", "bible", a file or
    # folder path, or "hf:NAME[:SPLIT[:COLUMN]]" for a Hugging Face dataset.
    data: str = "default"
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    cache_dir: str = ""  # "" means $SOPHIA_CACHE or ~/.cache/sophia
    # Optimization. None means "the preset's value for this optimizer".
    optimizer: str = "sophiag"
    lr: float | None = None
    min_lr: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    weight_decay: float | None = None
    rho: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 200
    warmup_steps: int = 20
    grad_clip: float = 1.0  # 0 disables clipping
    hessian_every: int = 10
    # share of the step's batch used for a Hessian refresh: 1/4 costs ~2.6% of training time at
    # k=10 against ~10% for the whole batch, with no loss change beyond seed noise (RESULTS.md)
    hessian_fraction: float = 0.25
    dtype: str = "auto"  # autocast dtype; auto = bfloat16 on a CUDA GPU that supports it
    device: str = "auto"
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default (all cores)
    parallel: str = "none"  # none, ddp or fsdp; ddp/fsdp under torchrun (docs/DISTRIBUTED.md)
    seed: int = 0
    compile: bool = False
    # Evaluation, logging, checkpoints.
    eval_every: int = 25
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: only at the end
    out_dir: str = ""  # "" means runs/<preset>-<optimizer>-<time>
    tensorboard: bool = False
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    progress: bool = True

    @property
    def betas(self) -> tuple[float, float]:
        return (float(self.beta1), float(self.beta2))  # type: ignore[arg-type]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size


@dataclass(frozen=True)
class Preset:
    """A named starting point: field values plus a hyperparameter table per optimizer."""

    description: str
    values: dict[str, Any]
    optimizers: dict[str, OptimizerHparams] = field(default_factory=dict)


def _gpt2(n_layer: int, n_head: int, n_embd: int, adamw: tuple, sophiag: tuple) -> Preset:
    """The paper's GPT-2 recipe (Liu et al., 2023, Table/Appendix; nanoGPT on OpenWebText)."""
    adam_lr, adam_min = adamw
    sophia_lr, sophia_min, rho = sophiag
    return Preset(
        description=f"GPT-2 {n_layer}L/{n_head}H/{n_embd}: 480x1024 tokens/step, 100k steps, bf16",
        values=dict(
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, dropout=0.0,
            tokenizer="bpe", bpe_vocab_size=50304,
            batch_size=8, grad_accum=60, max_steps=100_000, warmup_steps=2000, grad_clip=1.0,
            hessian_every=10, hessian_fraction=0.25, dtype="bfloat16",
            eval_every=1000, eval_batches=200, checkpoint_every=1000,
        ),
        optimizers={
            "adamw": OptimizerHparams(adam_lr, adam_min, (0.9, 0.95), 0.1),
            "sophiag": OptimizerHparams(sophia_lr, sophia_min, (0.965, 0.99), 0.2, rho),
            # Not in the paper's tables: SophiaH borrows Sophia-G's row; Lion follows its
            # paper's advice of a 3-10x smaller lr and a 3-10x larger decay than AdamW.
            "sophiah": OptimizerHparams(sophia_lr, sophia_min, (0.965, 0.99), 0.2, rho),
            "lion": OptimizerHparams(adam_lr / 5, adam_min / 5, (0.9, 0.99), 1.0),
        },
    )


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        description="0.8M parameters, bytes, context 64: hundreds of steps a minute on CPU",
        # One thread: its matrices are too small for more to pay much, and on a shared 2-core
        # machine two busy-waiting threads ran 5x slower than one (1.6 s vs 0.32 s a step).
        values={"threads": 1},
        # Centred by 100-step pilots, then tuned on the lr grid in benchmarks/RESULTS.md.
        # Sophia's rho is far above the paper's 0.05: with h still warming up (its EMA has
        # seen only 20 refreshes in 200 steps, with no bias correction) rho = 0.05 clipped
        # 98-100% of coordinates, a pure sign step; rho = 2 leaves 10-20% unclipped.
        optimizers={
            "adamw": OptimizerHparams(3e-3, 3e-4, (0.9, 0.95), 0.1),
            "sophiag": OptimizerHparams(1e-3, 1e-4, (0.965, 0.99), 0.2, 2.0),
            "sophiah": OptimizerHparams(1e-3, 1e-4, (0.965, 0.99), 0.2, 2.0),
            "lion": OptimizerHparams(1e-3, 1e-4, (0.9, 0.99), 1.0),
        },
    ),
    "gpt2-small": _gpt2(12, 12, 768, adamw=(6e-4, 3e-5), sophiag=(6e-4, 1.5e-5, 0.05)),
    "gpt2-medium": _gpt2(24, 16, 1024, adamw=(3e-4, 6e-5), sophiag=(7e-4, 1e-5, 0.08)),
    "gpt2-large": _gpt2(36, 20, 1280, adamw=(2e-4, 1e-5), sophiag=(3e-4, 1e-5, 0.05)),
}

_FIELDS = {f.name: f for f in fields(Config)}


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_type(name: str) -> type:
    """The non-None type of a Config field (``float | None`` -> ``float``)."""
    hint = typing.get_type_hints(Config)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def coerce(name: str, value: Any) -> Any:
    """Convert a TOML or command-line value for field ``name`` to its type, or raise."""
    if name not in _FIELDS:
        raise SophiaError(
            f"unknown setting {name!r}{_suggest(name, _FIELDS)}; valid settings are listed by "
            "`sophia train --help`"
        )
    kind = _field_type(name)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is int and isinstance(value, str):
            number = float(value)  # accepts "1e3"; rejects "2.5" below
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        return kind(value)
    except (TypeError, ValueError):
        raise SophiaError(f"bad value {value!r} for {name}: expected {kind.__name__}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML file of Config fields; nested tables are flattened by their last key."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise SophiaError(f"config file {str(path)!r} does not exist; check the path") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SophiaError(f"cannot read config file {str(path)!r}: {exc}; fix the TOML") from None
    flat: dict[str, Any] = {}

    def walk(table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value)
            else:
                flat[key.replace("-", "_")] = value

    walk(raw)
    return {key: coerce(key, value) for key, value in flat.items()}


def make_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> Config:
    """A validated, resolved Config: ``preset``'s values updated by ``overrides``.

    ``overrides`` maps field names to values (strings are converted); ``None`` values are
    ignored, so an argparse namespace with unset flags can be passed through unchanged.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset = overrides.pop("preset", preset)
    if preset not in PRESETS:
        raise SophiaError(
            f"unknown preset {preset!r}{_suggest(preset, PRESETS)}; choose one of "
            f"{', '.join(PRESETS)}"
        )
    values = {**PRESETS[preset].values, **{k: coerce(k, v) for k, v in overrides.items()}}
    return resolve(Config(preset=preset, **values))


def resolve(config: Config) -> Config:
    """Fill unset optimizer hyperparameters from the preset's table, then validate."""
    if config.optimizer not in OPTIMIZERS:
        raise SophiaError(
            f"unknown optimizer {config.optimizer!r}{_suggest(config.optimizer, OPTIMIZERS)}; "
            f"choose one of {', '.join(OPTIMIZERS)}"
        )
    table = PRESETS[config.preset].optimizers[config.optimizer]
    filled = dict(
        lr=table.lr, min_lr=table.min_lr, beta1=table.betas[0], beta2=table.betas[1],
        weight_decay=table.weight_decay, rho=table.rho,
    )
    config = replace(
        config, **{k: v for k, v in filled.items() if getattr(config, k) is None}
    )
    _validate(config)
    return config


def _validate(config: Config) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SophiaError(message)

    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                 "max_steps", "hessian_every", "eval_batches", "max_bad_steps", "bpe_vocab_size"):
        need(getattr(config, name) >= 1, f"{name} must be at least 1, got {getattr(config, name)}")
    for name in ("warmup_steps", "eval_every", "threads", "checkpoint_every", "lr", "min_lr",
                 "weight_decay", "rho", "grad_clip"):
        need(getattr(config, name) >= 0, f"{name} must be >= 0, got {getattr(config, name)}")
    need(config.n_embd % config.n_head == 0,
         f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
    need(0.0 <= config.dropout < 1.0, f"dropout must be in [0, 1), got {config.dropout}")
    need(0.0 < config.val_fraction < 0.5,
         f"val_fraction must be in (0, 0.5), got {config.val_fraction}")
    need(0.0 < config.hessian_fraction <= 1.0,
         f"hessian_fraction must be in (0, 1], got {config.hessian_fraction}")
    need(0.0 <= config.beta1 < 1.0 and 0.0 <= config.beta2 < 1.0,  # type: ignore[operator]
         f"betas must be in [0, 1), got ({config.beta1}, {config.beta2})")
    need(config.min_lr <= config.lr,  # type: ignore[operator]
         f"min_lr ({config.min_lr}) must not exceed lr ({config.lr})")
    need(config.dtype in DTYPES, f"unknown dtype {config.dtype!r}; choose one of {DTYPES}")
    need(config.parallel in PARALLEL_MODES,
         f"unknown parallel mode {config.parallel!r}; choose one of {', '.join(PARALLEL_MODES)}")
    need(not (config.optimizer == "sophiah" and config.parallel == "fsdp"),
         "sophiah cannot run under --parallel fsdp (FSDP2 gathers parameters outside autograd: "
         "no Hessian-vector product); use --parallel ddp, or sophiag")
    need(config.tokenizer in TOKENIZERS,
         f"unknown tokenizer {config.tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain JSON/TOML-friendly values."""
    return dataclasses.asdict(config)
