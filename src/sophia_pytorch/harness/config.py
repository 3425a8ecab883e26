"""Run configuration: four sections (model, data, optimizer, run), presets, TOML and flags.

A :class:`Config` holds a :class:`ModelConfig`, :class:`DataConfig`, :class:`OptimizerConfig`
and :class:`RunConfig`. Every field also has a flat name, unique across sections (its field
name, except ``data.source`` -> ``data`` and ``optimizer.name`` -> ``optimizer``): the
command-line flags (``--n-layer``) and flat TOML keys use it.

Precedence, lowest first: the preset's values, then a TOML file (``[model]``, ``[data]``,
``[optimizer]``, ``[run]`` tables, or flat ``key = value`` pairs), then ``--flag value``
overrides. Optimizer hyperparameters left unset (``None``) are filled from the preset's row
for the chosen optimizer by :func:`resolve`, so ``--optimizer adamw`` picks AdamW's tuned lr
without further flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import tomllib

from .errors import SophiaError

__all__ = [
    "OPTIMIZERS",
    "VARIANTS",
    "PRESETS",
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "OptimizerHparams",
    "Preset",
    "RunConfig",
    "base_optimizer",
    "flatten",
    "identity",
    "load_toml",
    "make_config",
    "optimizer_names",
    "resolve",
    "to_dict",
]

OPTIMIZERS = ("sophiag", "sophiah", "adamw", "lion", "muon")
SOPHIA = ("sophiag", "sophiah")  # the optimizers that take sophia_options


def _official_defaults() -> dict[str, Any]:
    import sophia_pytorch

    return dict(getattr(sophia_pytorch, "OFFICIAL_DEFAULTS", {}))


# Variants "<base>-<variant>": the base optimizer (whose preset row they use) and the extra
# constructor keywords, read when the optimizer is built; the row and sophia_options win.
VARIANTS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "sophiag-official": ("sophiag", _official_defaults),  # the authors' SophiaG
}
# Keywords the harness sets from its own settings, not from sophia_options: where to set them.
RESERVED_OPTIONS = {"params": "the model's parameters", "lr": "--lr", "betas": "--beta1/--beta2",
                    "weight_decay": "--weight-decay", "rho": "--rho",
                    "refresh_every": "--refresh-every"}


def optimizer_names() -> tuple[str, ...]:
    """Every optimizer name a config may hold: the base optimizers, then the variants."""
    return (*OPTIMIZERS, *VARIANTS)


def base_optimizer(name: str) -> str:
    """The base optimizer of ``name`` (a variant's base, or ``name`` itself)."""
    return VARIANTS[name][0] if name in VARIANTS else name
DTYPES = ("auto", "float32", "bfloat16")
TOKENIZERS = ("byte", "bpe")
PARALLEL_MODES = ("none", "ddp", "fsdp")  # sophia_pytorch.harness.distributed.wrap_model


@dataclass(frozen=True)
class OptimizerHparams:
    """One optimizer's tuned hyperparameters in a preset (``rho`` is used by Sophia only).

    For ``muon`` the row is Muon's (on the hidden matrices; ``betas[0]`` is its momentum,
    ``betas[1]`` unused); its AdamW part (embeddings, norms, biases) takes the preset's
    ``adamw`` row, its lr scaled alike when Muon's lr is (lr grid, ``--lr``).
    """

    lr: float
    min_lr: float
    betas: tuple[float, float]
    weight_decay: float
    rho: float = 0.0


# Run settings that do not change a run's numbers: where files go, how progress shows.
_NOT_IDENTITY = {"identity": False}
# Settings a resumed run must keep (besides the whole model and data sections).
_FIXED = {"fixed": True}
MAX_SEED = 2**63 - 1  # torch.manual_seed's range


@dataclass
class ModelConfig:
    """The GPT (see ``sophia_pytorch.harness.model``); fixed for the life of a run."""

    fixed_on_resume: ClassVar[bool] = True

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64  # context length, tokens
    dropout: float = 0.0


@dataclass
class DataConfig:
    """The corpus, its tokenizer and its split; fixed for the life of a run.

    ``source``: "default" (Shakespeare + King James Bible), "shakespeare", "bible", a file
    or folder path, or "hf:NAME[:SPLIT[:COLUMN]]" for a Hugging Face dataset.
    """

    fixed_on_resume: ClassVar[bool] = True

    source: str = field(default="default", metadata={"flag": "data"})
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05


@dataclass
class OptimizerConfig:
    """The optimizer, its schedule and Sophia's Hessian refresh.

    ``name`` is one of ``OPTIMIZERS`` or ``VARIANTS``. Fields that default to None (lr,
    min_lr, beta1, beta2, weight_decay, rho) are the preset's row for ``name`` (a variant:
    its base's row) unless set. ``sophia_options`` go to SophiaG/SophiaH as keywords.
    """

    fixed_on_resume: ClassVar[bool] = False

    name: str = field(default="sophiag", metadata={"flag": "optimizer", **_FIXED})
    lr: float | None = None  # peak learning rate
    min_lr: float | None = None  # the cosine's floor
    beta1: float | None = None
    beta2: float | None = None
    weight_decay: float | None = None
    rho: float | None = None  # Sophia's clipping scale (gamma)
    warmup_steps: int = 20
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables it
    refresh_every: int = 10  # k: Sophia refreshes its Hessian estimate every k steps
    # The share of the step's batch the refresh uses (why 1/4: benchmarks/RESULTS.md,
    # "Harness: Hessian refresh cost").
    refresh_fraction: float = 0.25
    # More SophiaG/SophiaH constructor keywords (bias_correction=True, ...).
    sophia_options: dict[str, Any] = field(default_factory=dict)

    @property
    def betas(self) -> tuple[float, float]:
        return (float(self.beta1), float(self.beta2))  # type: ignore[arg-type]


@dataclass
class RunConfig:
    """How the run is carried out: batch, length, device, evaluation, files."""

    fixed_on_resume: ClassVar[bool] = False

    batch_size: int = 32  # rows per micro-batch (per rank)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 200
    seed: int = field(default=0, metadata=_FIXED)  # model init, data order, Hessian draws
    dtype: str = "auto"  # autocast dtype; auto = bfloat16 on a CUDA GPU that supports it
    device: str = "auto"
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default (all cores)
    parallel: str = "none"  # none, ddp or fsdp; ddp/fsdp under torchrun (docs/DISTRIBUTED.md)
    compile: bool = False
    eval_every: int = 25
    eval_batches: int = field(default=8, metadata=_FIXED)  # the same val set all run long
    checkpoint_every: int = field(default=0, metadata=_NOT_IDENTITY)  # 0: only at the end
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    out_dir: str = field(default="", metadata=_NOT_IDENTITY)  # "": runs/<preset>-<optim>-<time>
    cache_dir: str = field(default="", metadata=_NOT_IDENTITY)  # "": $SOPHIA_CACHE or ~/.cache
    tensorboard: bool = field(default=False, metadata=_NOT_IDENTITY)
    progress: bool = field(default=True, metadata=_NOT_IDENTITY)


@dataclass
class Config:
    """Everything one training run needs. Units: steps are optimizer steps, batch sizes rows.

    One optimizer step sees ``run.batch_size * run.grad_accum`` sequences of
    ``model.block_size`` tokens.
    """

    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step sees on one rank."""
        return self.run.batch_size * self.run.grad_accum * self.model.block_size


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig,
                             "optimizer": OptimizerConfig, "run": RunConfig}


def flat_name(f: dataclasses.Field) -> str:
    """The flag and flat TOML name of a section field."""
    return f.metadata.get("flag", f.name)


# flat name -> (section, field name)
FLAT: dict[str, tuple[str, str]] = {
    flat_name(f): (section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)
}
_RENAMED = {"hessian_every": "refresh_every", "hessian_fraction": "refresh_fraction"}
ROW_FIELDS = tuple(f.name for f in fields(OptimizerConfig) if f.default is None)


def fixed_on_resume() -> list[str]:
    """Flat names of the settings a resumed run must keep: its model, data, optimizer, seed."""
    return [flat_name(f) for cls in SECTIONS.values() for f in fields(cls)
            if cls.fixed_on_resume or f.metadata.get("fixed")]


def identity(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The flat settings that decide a run's numbers (all but ``_NOT_IDENTITY`` ones), in
    JSON form: two runs with equal identities train alike. ``config``: a Config or its
    ``to_dict`` (as saved in config.json and checkpoints)."""
    values = flatten(to_dict(config) if isinstance(config, Config) else config)
    skipped = {flat_name(f) for cls in SECTIONS.values() for f in fields(cls)
               if f.metadata.get("identity") is False}
    return json.loads(json.dumps({k: v for k, v in sorted(values.items()) if k not in skipped}))


@dataclass(frozen=True)
class Preset:
    """A named starting point: flat field values plus a hyperparameter row per optimizer."""

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
            refresh_every=10, refresh_fraction=0.25, dtype="bfloat16",
            eval_every=1000, eval_batches=200, checkpoint_every=1000,
        ),
        optimizers={
            "adamw": OptimizerHparams(adam_lr, adam_min, (0.9, 0.95), 0.1),
            "sophiag": OptimizerHparams(sophia_lr, sophia_min, (0.965, 0.99), 0.2, rho),
            # Not in the paper's tables: SophiaH borrows Sophia-G's row; Lion follows its
            # paper's advice of a 3-10x smaller lr and a 3-10x larger decay than AdamW.
            "sophiah": OptimizerHparams(sophia_lr, sophia_min, (0.965, 0.99), 0.2, rho),
            "lion": OptimizerHparams(adam_lr / 5, adam_min / 5, (0.9, 0.99), 1.0),
            # Not tuned at this size: Muon's usual lr 0.02, floor at AdamW's ratio.
            "muon": OptimizerHparams(0.02, 0.02 * adam_min / adam_lr, (0.95, 0.0), 0.1),
        },
    )


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        description="0.8M parameters, bytes, context 64: hundreds of steps a minute on CPU",
        # One thread: its matrices are too small for more to pay (docs/HARNESS.md).
        values={"threads": 1},
        # Tuned on the lr grid; why Sophia's rho is far above the paper's 0.05 and why
        # Sophia-G's beta1 is 0.9, not the paper's 0.965: benchmarks/RESULTS.md,
        # "Harness: tiny comparison" and "Convergence".
        optimizers={
            "adamw": OptimizerHparams(3e-3, 3e-4, (0.9, 0.95), 0.1),
            "sophiag": OptimizerHparams(1e-3, 1e-4, (0.9, 0.99), 0.2, 2.0),
            "sophiah": OptimizerHparams(1e-3, 1e-4, (0.965, 0.99), 0.2, 2.0),
            "lion": OptimizerHparams(1e-3, 1e-4, (0.9, 0.99), 1.0),
            # Muon's lr: the best of a 100-step pilot over 0.005-0.1 (docs/HARNESS.md).
            "muon": OptimizerHparams(0.05, 0.005, (0.95, 0.0), 0.1),
        },
    ),
    "gpt2-small": _gpt2(12, 12, 768, adamw=(6e-4, 3e-5), sophiag=(6e-4, 1.5e-5, 0.05)),
    "gpt2-medium": _gpt2(24, 16, 1024, adamw=(3e-4, 6e-5), sophiag=(7e-4, 1e-5, 0.08)),
    "gpt2-large": _gpt2(36, 20, 1280, adamw=(2e-4, 1e-5), sophiag=(3e-4, 1e-5, 0.05)),
}


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(name: str, where: str = "") -> SophiaError:
    return SophiaError(
        f"unknown setting {name!r}{where}{_suggest(name, FLAT)}; valid settings are listed "
        "by `sophia train --help`"
    )


def field_type(name: str) -> type:
    """The non-None type of the field with flat name ``name`` (``float | None`` -> float)."""
    section, attribute = FLAT[name]
    hint = typing.get_type_hints(SECTIONS[section])[attribute]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def coerce(name: str, value: Any) -> Any:
    """Convert a TOML or command-line value for flat setting ``name`` to its type, or raise."""
    if name not in FLAT:
        raise _unknown(name)
    kind = field_type(name)
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
        if kind is str and not isinstance(value, str):
            raise ValueError(value)
        if kind is dict and not isinstance(value, dict):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise SophiaError(f"bad value {value!r} for {name}: expected {kind.__name__}") from None


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """Flat settings from a mix of flat keys and ``model``/``data``/``optimizer``/``run``
    tables (as in TOML, ``to_dict`` or a checkpoint); old names are renamed."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            by_name = {f.name: flat_name(f) for f in fields(SECTIONS[key])}
            for inner, inner_value in value.items():
                inner = _RENAMED.get(inner.replace("-", "_"), inner.replace("-", "_"))
                if inner not in by_name and inner not in by_name.values():
                    raise _unknown(inner, f" in [{key}]")
                flat[by_name.get(inner, inner)] = inner_value
        elif isinstance(value, dict) and key not in FLAT:
            raise SophiaError(
                f"unknown section [{key}]; use [model], [data], [optimizer] and [run], or "
                "flat key = value lines"
            )
        else:
            flat[_RENAMED.get(key, key)] = value
    return flat


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file of settings (sections or flat keys) into flat, typed settings."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise SophiaError(f"config file {str(path)!r} does not exist; check the path") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SophiaError(f"cannot read config file {str(path)!r}: {exc}; fix the TOML") from None
    return {key: coerce(key, value) for key, value in flatten(raw).items()}


def make_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> Config:
    """A validated, resolved Config: ``preset``'s values updated by ``overrides``.

    ``overrides`` maps flat setting names (or section tables, see :func:`flatten`) to
    values (strings are converted); ``None`` values are ignored, so an argparse namespace
    with unset flags can be passed through unchanged.
    """
    overrides = {k: v for k, v in flatten(overrides or {}).items() if v is not None}
    preset = overrides.pop("preset", preset)
    if preset not in PRESETS:
        raise SophiaError(
            f"unknown preset {preset!r}{_suggest(str(preset), PRESETS)}; choose one of "
            f"{', '.join(PRESETS)}"
        )
    values = {**PRESETS[preset].values, **{k: coerce(k, v) for k, v in overrides.items()}}
    config = Config(preset=preset)
    for name, value in values.items():
        section, attribute = FLAT[name]
        setattr(getattr(config, section), attribute, value)
    return resolve(config)


def resolve(config: Config) -> Config:
    """Fill unset optimizer hyperparameters from the preset's row, then validate."""
    name = config.optimizer.name
    if name not in optimizer_names():
        raise SophiaError(
            f"unknown optimizer {name!r}{_suggest(name, optimizer_names())}; "
            f"choose one of {', '.join(optimizer_names())}"
        )
    row = PRESETS[config.preset].optimizers[base_optimizer(name)]
    filled = dict(lr=row.lr, min_lr=row.min_lr, beta1=row.betas[0], beta2=row.betas[1],
                  weight_decay=row.weight_decay, rho=row.rho)
    optimizer = replace(config.optimizer, **{
        k: v for k, v in filled.items() if getattr(config.optimizer, k) is None})
    config = replace(config, optimizer=optimizer)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SophiaError(message)

    flat = {name: getattr(getattr(config, s), a) for name, (s, a) in FLAT.items()}
    for name, value in flat.items():
        need(not isinstance(value, float) or math.isfinite(value),
             f"{name} must be finite, got {value}; give a finite --{name.replace('_', '-')}")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                 "max_steps", "refresh_every", "eval_batches", "max_bad_steps",
                 "bpe_vocab_size"):
        need(flat[name] >= 1, f"{name} must be at least 1, got {flat[name]}")
    for name in ("warmup_steps", "eval_every", "threads", "checkpoint_every", "lr", "min_lr",
                 "weight_decay", "rho", "grad_clip"):
        need(flat[name] >= 0, f"{name} must be >= 0, got {flat[name]}")
    model, optimizer, run = config.model, config.optimizer, config.run
    need(0 <= run.seed <= MAX_SEED, f"seed must be in [0, 2**63 - 1], got {run.seed}")
    cpus = os.cpu_count() or 1
    need(run.threads <= cpus, f"threads {run.threads} exceeds the {cpus} CPUs here; use "
                              f"--threads 1..{cpus} (0: torch's default)")
    need(config.data.bpe_vocab_size <= 2**32,
         f"bpe_vocab_size must be at most 2**32, got {config.data.bpe_vocab_size}")
    need(model.n_embd % model.n_head == 0,
         f"n_embd ({model.n_embd}) must be a multiple of n_head ({model.n_head})")
    need(0.0 <= model.dropout < 1.0, f"dropout must be in [0, 1), got {model.dropout}")
    need(0.0 < config.data.val_fraction < 0.5,
         f"val_fraction must be in (0, 0.5), got {config.data.val_fraction}")
    need(0.0 < optimizer.refresh_fraction <= 1.0,
         f"refresh_fraction must be in (0, 1], got {optimizer.refresh_fraction}")
    need(0.0 <= optimizer.beta1 < 1.0 and 0.0 <= optimizer.beta2 < 1.0,  # type: ignore[operator]
         f"betas must be in [0, 1), got ({optimizer.beta1}, {optimizer.beta2})")
    need(optimizer.min_lr <= optimizer.lr,  # type: ignore[operator]
         f"min_lr ({optimizer.min_lr}) must not exceed lr ({optimizer.lr})")
    need(run.dtype in DTYPES, f"unknown dtype {run.dtype!r}; choose one of {DTYPES}")
    need(run.parallel in PARALLEL_MODES,
         f"unknown parallel mode {run.parallel!r}; choose one of {', '.join(PARALLEL_MODES)}")
    _validate_sophia_options(optimizer)
    need(not (optimizer.name == "sophiah" and run.parallel == "fsdp"),
         "sophiah cannot run under --parallel fsdp (FSDP2 gathers parameters outside autograd: "
         "no Hessian-vector product); use --parallel ddp, or sophiag")
    need(not (optimizer.name == "muon" and run.parallel == "fsdp"),
         "muon cannot run under --parallel fsdp (it orthogonalises whole matrices, FSDP2 holds "
         "shards); use --parallel ddp")
    need(config.data.tokenizer in TOKENIZERS,
         f"unknown tokenizer {config.data.tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")


def _validate_sophia_options(optimizer: OptimizerConfig) -> None:
    options = optimizer.sophia_options
    if options and base_optimizer(optimizer.name) not in SOPHIA:
        raise SophiaError(
            f"sophia_options {sorted(options)} apply to sophiag and sophiah only, not "
            f"{optimizer.name}; drop --sophia-option or pick a Sophia optimizer"
        )
    for key, value in options.items():
        if not key.isidentifier():
            raise SophiaError(f"sophia option {key!r} is not a keyword name; write KEY=VALUE")
        if key in RESERVED_OPTIONS:
            raise SophiaError(f"sophia option {key!r} is set by the harness from "
                              f"{RESERVED_OPTIONS[key]}; drop it from the sophia options")
        if not _all_finite(value):
            raise SophiaError(f"sophia option {key}={value!r} is not finite; give a finite value")


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return True


def to_dict(config: Config) -> dict[str, Any]:
    """The config as nested plain JSON/TOML-friendly values (preset, then one table a section)."""
    return dataclasses.asdict(config)
