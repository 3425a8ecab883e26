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

Each field carries its rules beside it (:func:`setting`: bounds, choices, whether it is a
preset-row field, whether a resumed run must keep it, its doc); :func:`validate` checks each
section's fields against them, then the section's ``check`` (rules between its fields),
whatever the values came from: a preset, TOML, flags or Python (:func:`coerce` converts all
of them by one rule). Which optimizers exist is ``registry.OPTIMIZERS``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import operator
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from ..optimizer import SophiaH
from .errors import SophiaError
from .presets import PRESETS, OptimizerHparams, Preset
from .registry import OPTIMIZERS, RESERVED_OPTIONS

__all__ = [
    "OPTIMIZERS",
    "PRESETS",
    "ROW_FIELDS",
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "OptimizerHparams",
    "Preset",
    "RunConfig",
    "base_optimizer",
    "check_field",
    "flatten",
    "identity",
    "load_toml",
    "make_config",
    "optimizer_names",
    "resolve",
    "setting",
    "to_dict",
]

DTYPES = ("auto", "float32", "bfloat16")
TOKENIZERS = ("byte", "bpe")
PARALLEL_MODES = ("none", "ddp", "fsdp")  # sophia_pytorch.harness.distributed.wrap_model
SCHEDULES = ("cosine", "wsd")  # sophia_pytorch.harness.schedule
# Sophia's state_dtype: None, torch.bfloat16, torch.uint8 (8-bit block-wise quantized)
STATE_DTYPES = ("float32", "bfloat16", "uint8")
MAX_SEED = 2**63 - 1  # torch.manual_seed's range


def optimizer_names() -> tuple[str, ...]:
    """Every optimizer name a config may hold (``registry.OPTIMIZERS``), variants included."""
    return tuple(OPTIMIZERS)


def base_optimizer(name: str) -> str:
    """The preset row ``name`` takes: a variant's base, or ``name`` itself."""
    return OPTIMIZERS[name].row


def setting(default: Any = dataclasses.MISSING, *, doc: str, flag: str | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: tuple[str, ...] | None = None,
            row: bool = False, fixed: bool = False, identity: bool = True,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A section field with its rules beside it, read by :func:`check_field`.

    Args:
        doc: what the setting means (the flag's help).
        flag: its flat name when not the field's name (``data.source`` -> ``data``).
        ge, gt, le, lt: bounds (>=, >, <=, <) a number must keep.
        choices: the values a string may take.
        row: a preset-row hyperparameter: unset (None), it is the preset's row for the
            chosen optimizer; ``sophia compare`` gives each optimizer its own.
        fixed: a resumed run must keep it (besides the whole model and data sections).
        identity: whether it decides a run's numbers (False: where files go, how progress
            shows), so ``compare`` reuses a run that differs only there.
    """
    metadata = {"doc": doc, "bounds": {"ge": ge, "gt": gt, "le": le, "lt": lt},
                "choices": choices, "row": row, "fixed": fixed, "identity": identity,
                **({"flag": flag} if flag else {})}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def _rule(bounds: dict[str, float | None]) -> str:
    """The bounds as words: "at least 1", "in [0, 1)", "above 0"."""
    def text(value: float) -> str:
        return str(value) if isinstance(value, int) else f"{value:g}"  # ints exact

    low_bracket, low = ("[", bounds["ge"]) if bounds["ge"] is not None else ("(", bounds["gt"])
    high_bracket, high = ("]", bounds["le"]) if bounds["le"] is not None else (")", bounds["lt"])
    if low is not None and high is not None:
        return f"in {low_bracket}{text(low)}, {text(high)}{high_bracket}"
    if low is not None:
        return f"{'at least' if low_bracket == '[' else 'above'} {text(low)}"
    assert high is not None  # called only for a value that broke a bound
    return f"{'at most' if high_bracket == ']' else 'below'} {text(high)}"


def check_field(f: dataclasses.Field, value: Any) -> None:
    """Refuse ``value`` for field ``f`` if it breaks the rules beside it (finite, bounds,
    choices); None (a row field left to the preset) passes."""
    name = flat_name(f)
    option = "--" + name.replace("_", "-")
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise SophiaError(f"{name} must be finite, got {value}; give a finite {option}")
    bounds, choices = f.metadata.get("bounds", {}), f.metadata.get("choices")
    ops = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
    if any(limit is not None and not ops[op](value, limit)  # exact: 2**63 is not 2**63 - 1
           for op, limit in bounds.items()):
        raise SophiaError(f"{name} must be {_rule(bounds)}, got {value}; give {option} "
                          f"{_rule(bounds)}")
    if choices is not None and value not in choices:
        raise SophiaError(f"unknown {name} {value!r}{_suggest(str(value), choices)}; choose "
                          f"one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """The GPT (see ``sophia_pytorch.harness.model``); fixed for the life of a run."""

    fixed_on_resume: ClassVar[bool] = True

    n_layer: int = setting(4, ge=1, doc="transformer blocks")
    n_head: int = setting(4, ge=1, doc="attention heads per block")
    n_embd: int = setting(128, ge=1, doc="width; a multiple of n_head")
    block_size: int = setting(64, ge=1, doc="context length, tokens")
    dropout: float = setting(0.0, ge=0.0, lt=1.0, doc="dropout probability")

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise SophiaError(f"n_embd ({self.n_embd}) must be a multiple of n_head "
                              f"({self.n_head}); change --n-embd or --n-head")


@dataclass
class DataConfig:
    """The corpus, its tokenizer and its split; fixed for the life of a run."""

    fixed_on_resume: ClassVar[bool] = True

    source: str = setting("default", flag="data",
                          doc='"default" (Shakespeare + King James Bible), "shakespeare", '
                              '"bible", a file or folder path, or "hf:NAME[:SPLIT[:COLUMN]]"')
    tokenizer: str = setting("byte", choices=TOKENIZERS, doc="UTF-8 bytes, or a trained BPE")
    bpe_vocab_size: int = setting(4096, ge=1, le=2**32, doc="the BPE's vocabulary")
    val_fraction: float = setting(0.05, gt=0.0, lt=0.5, doc="share of chunks for validation")

    def check(self) -> None:
        pass


@dataclass
class OptimizerConfig:
    """The optimizer, its schedule and Sophia's Hessian refresh.

    ``name`` is a key of ``registry.OPTIMIZERS``. The row fields (lr, min_lr, beta1, beta2,
    weight_decay, rho) are the preset's row for ``name`` (a variant: its base's row) unless
    set. ``sophia_options`` go to SophiaG/SophiaH as keywords.
    """

    fixed_on_resume: ClassVar[bool] = False

    name: str = setting("sophiag", flag="optimizer", fixed=True,
                        doc="the optimizer, a key of registry.OPTIMIZERS")
    lr: float | None = setting(None, ge=0.0, row=True, doc="peak learning rate")
    min_lr: float | None = setting(None, ge=0.0, row=True, doc="the schedule's floor")
    beta1: float | None = setting(None, ge=0.0, lt=1.0, row=True, doc="first-moment decay")
    beta2: float | None = setting(None, ge=0.0, lt=1.0, row=True, doc="second-moment decay")
    weight_decay: float | None = setting(None, ge=0.0, row=True, doc="decoupled decay")
    rho: float | None = setting(None, ge=0.0, row=True,
                                doc="Sophia's clipping scale (gamma)")
    schedule: str = setting("cosine", choices=SCHEDULES,
                            doc="cosine: warmup then cosine to min_lr at max_steps; wsd: "
                                "warmup, constant lr, then a linear decay to min_lr over "
                                "the last decay_fraction of max_steps")
    decay_fraction: float = setting(0.2, gt=0.0, le=1.0,
                                    doc="wsd: the share of max_steps the decay takes")
    warmup_steps: int = setting(20, ge=0, doc="linear warmup, steps")
    grad_clip: float = setting(1.0, ge=0.0, doc="global grad-norm clip; 0 disables it")
    refresh_every: int = setting(10, ge=1,
                                 doc="k: Sophia refreshes its Hessian estimate every k steps")
    # Why 1/4: experiments/RESULTS.md, "Harness: Hessian refresh cost".
    refresh_fraction: float = setting(0.25, gt=0.0, le=1.0,
                                      doc="the share of the step's batch the refresh uses")
    state_dtype: str = setting("float32", choices=STATE_DTYPES,
                               doc="Sophia's m and h: float32, bfloat16 (stochastically "
                                   "rounded; half the state memory), or uint8 (8-bit codes "
                                   "and a scale per 256, stochastically rounded; a quarter; "
                                   "SophiaG only)")
    sophia_options: dict[str, Any] = setting(
        default_factory=dict, doc="more SophiaG/SophiaH constructor keywords")

    @property
    def betas(self) -> tuple[float, float]:
        return (float(self.beta1), float(self.beta2))  # type: ignore[arg-type]

    def check(self) -> None:
        if self.min_lr > self.lr:  # type: ignore[operator]
            raise SophiaError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr}); lower "
                              "--min-lr")
        _check_sophia_options(self)
        options_class = OPTIMIZERS[self.name].options_class
        if self.state_dtype == "uint8" and options_class is not None \
                and issubclass(options_class, SophiaH):
            raise SophiaError(f"--state-dtype uint8 does not apply to {self.name}: 8-bit state "
                              "keeps h in an unsigned code and Hutchinson's h can be negative; "
                              "use --state-dtype bfloat16, or a SophiaG optimizer")
        if self.state_dtype != "float32" and not OPTIMIZERS[self.name].takes_options:
            takers = ", ".join(name for name, s in OPTIMIZERS.items() if s.takes_options)
            raise SophiaError(f"--state-dtype {self.state_dtype} applies to Sophia's state "
                              f"({takers}) only, not {self.name}; drop it or pick one of them")


@dataclass
class RunConfig:
    """How the run is carried out: batch, length, device, evaluation, files."""

    fixed_on_resume: ClassVar[bool] = False

    batch_size: int = setting(32, ge=1, doc="rows per micro-batch (per rank)")
    grad_accum: int = setting(1, ge=1, doc="micro-batches per optimizer step")
    max_steps: int = setting(200, ge=1, doc="optimizer steps")
    seed: int = setting(0, ge=0, le=MAX_SEED, fixed=True,
                        doc="model init, data order, Hessian draws")
    dtype: str = setting("auto", choices=DTYPES,
                         doc="autocast dtype; auto = bfloat16 on a CUDA GPU that supports it")
    device: str = setting("auto", doc="auto (CUDA if visible), cpu, cuda[:N] or mps")
    threads: int = setting(0, ge=0, doc="CPU threads for torch; 0 keeps torch's default")
    parallel: str = setting("none", choices=PARALLEL_MODES,
                            doc="ddp or fsdp under torchrun (docs/DISTRIBUTED.md)")
    compile: bool = setting(False, doc="torch.compile the model")
    eval_every: int = setting(25, ge=0, doc="evaluate every N steps (and at the end)")
    eval_batches: int = setting(8, ge=1, fixed=True, doc="the same val set all run long")
    checkpoint_every: int = setting(0, ge=0, identity=False, doc="0: only at the end")
    max_bad_steps: int = setting(5, ge=1, doc="abort after this many non-finite steps in a row")
    out_dir: str = setting("", identity=False, doc='"": runs/<preset>-<optimizer>-<time>')
    cache_dir: str = setting("", identity=False, doc='"": $SOPHIA_CACHE or ~/.cache/sophia')
    tensorboard: bool = setting(False, identity=False, doc="TensorBoard scalars")
    progress: bool = setting(True, identity=False, doc="a tqdm progress bar")

    def check(self) -> None:
        cpus = os.cpu_count() or 1
        if self.threads > cpus:
            raise SophiaError(f"threads {self.threads} exceeds the {cpus} CPUs here; use "
                              f"--threads 1..{cpus} (0: torch's default)")


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


SECTIONS: dict[str, type[ModelConfig | DataConfig | OptimizerConfig | RunConfig]] = {
    "model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "run": RunConfig}


def flat_name(f: dataclasses.Field) -> str:
    """The flag and flat TOML name of a section field."""
    return f.metadata.get("flag", f.name)


# flat name -> (section, field name)
FLAT: dict[str, tuple[str, str]] = {
    flat_name(f): (section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)
}
_RENAMED = {"hessian_every": "refresh_every", "hessian_fraction": "refresh_fraction"}
# The preset-row hyperparameters (marked ``row=True`` beside their fields).
ROW_FIELDS = tuple(f.name for f in fields(OptimizerConfig) if f.metadata.get("row"))


def field_doc(name: str) -> str:
    """The doc string beside the field of flat setting ``name``."""
    section, attribute = FLAT[name]
    return next(f.metadata.get("doc", "") for f in fields(SECTIONS[section])
                if f.name == attribute)


def fixed_on_resume() -> list[str]:
    """Flat names of the settings a resumed run must keep: its model, data, optimizer, seed."""
    return [flat_name(f) for cls in SECTIONS.values() for f in fields(cls)
            if cls.fixed_on_resume or f.metadata.get("fixed")]


def identity(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The flat settings that decide a run's numbers (all but ``identity=False`` ones), in
    JSON form: two runs with equal identities train alike. ``config``: a Config or its
    ``to_dict`` (as saved in config.json and checkpoints; a setting it predates counts as
    its default, which is how that run ran)."""
    values = {**_defaults(), **flatten(to_dict(config) if isinstance(config, Config)
                                       else config)}
    skipped = {flat_name(f) for cls in SECTIONS.values() for f in fields(cls)
               if f.metadata.get("identity") is False}
    return json.loads(json.dumps({k: v for k, v in sorted(values.items()) if k not in skipped}))


def _defaults() -> dict[str, Any]:
    """Flat name -> default of every field with a plain (non-None, non-factory) default."""
    return {flat_name(f): f.default for cls in SECTIONS.values() for f in fields(cls)
            if f.default is not dataclasses.MISSING and f.default is not None}




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
    """Convert a TOML, command-line or Python value for flat setting ``name`` to its type,
    or raise. One rule for every source: a command-line string is read as the TOML value
    would be ("4" and 4 are the same n_layer), and a boolean is never a number (TOML
    ``lr = true`` is refused as ``--lr true`` is)."""
    if name not in FLAT:
        raise _unknown(name)
    kind = field_type(name)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower() if isinstance(value, str) else None
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(value, bool) or (kind in (int, float) and
                                       not isinstance(value, (int, float, str))):
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
                spelled: str = inner.replace("-", "_")
                inner = _RENAMED.get(spelled, spelled)
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

    Args:
        preset: a key of ``PRESETS`` (default ``"tiny"``); a ``"preset"`` key in
            ``overrides`` takes precedence.
        overrides: flat setting names (or section tables, see :func:`flatten`) mapped to
            values (strings are converted); ``None`` values are ignored, so an argparse
            namespace with unset flags can be passed through unchanged (default None:
            the preset as it is).

    Raises:
        SophiaError: an unknown preset or setting, or a value that breaks its rule.
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
    if name not in OPTIMIZERS:
        raise SophiaError(
            f"unknown optimizer {name!r}{_suggest(name, OPTIMIZERS)}; "
            f"choose one of {', '.join(OPTIMIZERS)}"
        )
    row = PRESETS[config.preset].optimizers[base_optimizer(name)]
    filled: dict[str, Any] = dict(lr=row.lr, min_lr=row.min_lr, beta1=row.betas[0],
                                  beta2=row.betas[1], weight_decay=row.weight_decay, rho=row.rho)
    optimizer = replace(config.optimizer, **{
        k: v for k, v in filled.items() if getattr(config.optimizer, k) is None})
    config = replace(config, optimizer=optimizer)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check every section: each field against the rules beside it, then the section's own
    ``check`` (rules between its fields), then the rules between sections.

    Raises:
        SophiaError: the first rule broken, naming the setting and the fix.
    """
    for section in SECTIONS:
        values = getattr(config, section)
        for f in fields(values):
            check_field(f, getattr(values, f.name))
        values.check()
    spec = OPTIMIZERS[config.optimizer.name]
    if config.run.parallel == "fsdp" and spec.fsdp_refusal:
        raise SophiaError(spec.fsdp_refusal)


def _check_sophia_options(optimizer: OptimizerConfig) -> None:
    options, spec = optimizer.sophia_options, OPTIMIZERS[optimizer.name]
    if options and not spec.takes_options:
        takers = [name for name, s in OPTIMIZERS.items() if s.takes_options]
        raise SophiaError(
            f"sophia_options {sorted(options)} apply to {', '.join(takers)} only, not "
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
    unknown = spec.unknown_options(options)
    if unknown:
        cls = spec.options_class.__name__  # type: ignore[union-attr]
        raise SophiaError(f"{cls} takes no keyword {unknown[0]!r} (from the sophia options); "
                          f"check its name in help(sophia_pytorch.{cls})")


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
