"""Resume: a run continued from a checkpoint, every part of it in one place.

A resume reads and verifies its checkpoint once (:meth:`ResumePoint.read`, the only call of
``.checkpoint.load_checkpoint`` on it) and hands that :class:`ResumePoint` along: ``sophia
train --resume`` takes the saved settings from it (:func:`resume_settings`, which refuses an
edited ``config.json``), and the trainer loads it (:func:`restore`): the settings the run
cannot change are refused, those it can are applied (optimizer hyperparameters diffed against
the saved config, no second optimizer built), the lr change is announced, and model,
optimizer and RNG states are put back. :func:`branch_off` sets aside the newer checkpoint of
a run whose older ``stable.pt`` is resumed in its own folder. The checkpoint format and its
converters are ``.checkpoint``'s.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .checkpoint import (
    CHECKPOINT,
    STABLE_CHECKPOINT,
    TRAINING_KEYS,
    load_checkpoint,
    set_rng_state,
    train_state_of,
    upgrade,
)
from .config import (
    SECTIONS,
    Config,
    OptimizerConfig,
    fixed_on_resume,
    flat_name,
    flatten,
    to_dict,
)
from .errors import SophiaError, writing
from .rundir import set_aside
from .schedule import LRSchedule

__all__ = ["ResumePoint", "branch_off", "check_config_json", "describe_lr_change", "restore",
           "resume_folder", "resume_settings"]

# The optimizer settings that reach its constructor's groups (the lr is the schedule's).
CONSTRUCTOR_SETTINGS = ("beta1", "beta2", "weight_decay", "rho", "refresh_every",
                        "sophia_options")
# Group values the optimizer moves as it trains (SophiaG's rho, under an unclipped_band),
# by the setting they start from: a saved value is kept unless that setting changed.
ADAPTED = {"rho": "rho"}


@dataclass
class ResumePoint:
    """A training checkpoint, read and verified once. :func:`restore` drops its model and
    optimizer states once loaded (:meth:`release`): a run holds no second copy of them.

    Attributes:
        path: the checkpoint file (``<folder>/checkpoint.pt`` when a folder was given).
        checkpoint: what it holds, as written (any format; :meth:`upgraded` converts it).
        given: the file or folder as the user named it (errors quote it).
    """

    path: Path
    checkpoint: dict[str, Any]
    given: str | Path

    @classmethod
    def read(cls, where: str | Path) -> ResumePoint:
        """The checkpoint ``where`` (a file, or a run folder's checkpoint.pt), CRC-checked.

        Raises:
            SophiaError: no such file, a damaged one, or one that is not a training
                checkpoint written by ``sophia train``.
        """
        path = Path(where) / CHECKPOINT if Path(where).is_dir() else Path(where)
        checkpoint = load_checkpoint(path)
        missing = [key for key in TRAINING_KEYS if key not in checkpoint]
        if missing or ("train_state" not in checkpoint and "step" not in checkpoint):
            raise SophiaError(
                f"{str(where)!r} is not a sophia training checkpoint (it lacks "
                f"{', '.join(missing) or 'train_state'}); point --resume at a run folder or "
                "checkpoint.pt written by `sophia train`"
            )
        return cls(path, checkpoint, where)

    @classmethod
    def of(cls, resume: str | Path | ResumePoint) -> ResumePoint:
        """``resume`` itself, or the checkpoint it names, read."""
        return resume if isinstance(resume, ResumePoint) else cls.read(resume)

    @property
    def folder(self) -> Path:
        """The run folder the checkpoint is in."""
        return self.path.parent

    @property
    def saved_config(self) -> dict[str, Any]:
        """The settings the checkpoint was trained with (nested, as ``to_dict`` gives)."""
        return self.checkpoint["config"]

    def upgraded(self, config: Config) -> dict[str, Any]:
        """The checkpoint as format 3 (format 1's tokens counted at ``config``'s rate)."""
        return upgrade(self.checkpoint, config.tokens_per_step)

    def release(self) -> None:
        """Drop the model and optimizer states (loaded; the rest stays readable)."""
        self.checkpoint = {**self.checkpoint, "model": None, "optimizer": None}


def resume_folder(resume: str | Path | ResumePoint) -> Path:
    """The run folder of a resume target (a ResumePoint, checkpoint file or run folder)."""
    if isinstance(resume, ResumePoint):
        return resume.folder
    return Path(resume) if Path(resume).is_dir() else Path(resume).parent


def resume_settings(point: ResumePoint, overrides: dict[str, Any]) -> dict[str, Any]:
    """The flat settings of ``sophia train --resume``: the checkpoint's, its folder as
    ``out_dir``, then ``overrides`` (the flags and ``--config`` given now) on top.

    Raises:
        SophiaError: the folder's config.json was edited (:func:`check_config_json`).
    """
    saved = flatten(point.saved_config) if isinstance(point.saved_config, dict) else {}
    if saved:
        check_config_json(point.folder, saved, set(overrides))
    return {**saved, "out_dir": str(point.folder), **overrides}


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


def restore(point: ResumePoint, config: Config, model: nn.Module,
            optimizer: torch.optim.Optimizer, *, schedule: LRSchedule,
            announce: bool = True) -> dict[str, Any]:
    """Load ``point`` into a freshly built ``model`` and ``optimizer`` (and the RNGs) for a
    run with ``config``; return the checkpoint's TrainState (a dict, for
    ``TrainState.load_state_dict``).

    Settings ``config`` changes are applied (optimizer hyperparameters, see
    :func:`apply_changed_settings`); a change of the lr schedule is printed when
    ``announce`` (rank 0). An FSDP2 checkpoint's shards are resharded to this job's ranks.

    Raises:
        SophiaError: a setting a resume cannot change (model, data, optimizer, seed,
            validation set), a ``max_steps`` below the checkpoint's step, or an unsharded
            checkpoint under ``--parallel fsdp``.
    """
    state = point.upgraded(config)
    saved, step = state["config"], state["train_state"]["step"]
    _check_compatible(saved, config, point.given)
    _check_steps_left(step, saved, config, point.given)
    built = group_settings(optimizer)
    if state["sharded"]:  # an FSDP2 run's: DCP reshards it to this job's ranks
        distributed.load_sharded(point.folder / state["sharded"], model, optimizer)
    elif config.run.parallel == "fsdp":
        raise SophiaError(
            f"checkpoint {str(point.given)!r} is not sharded: resume it with --parallel ddp "
            "or none"
        )
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    del state["model"], state["optimizer"]
    point.release()
    saved_settings = _section(saved, "optimizer")
    apply_changed_settings(optimizer, built, saved_settings, config.optimizer)
    old = _saved_config(saved, config)
    assert old.optimizer.lr is not None and config.optimizer.lr is not None  # resolved rows
    change = describe_lr_change(step, LRSchedule.from_config(old), schedule,
                                old.optimizer.lr, config.optimizer.lr)
    if change and announce:
        print(f"note: {change}", file=sys.stderr)
    set_rng_state(state["rng"])
    return state["train_state"]


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's hyperparameters (all but its parameters)."""
    return [{k: v for k, v in group.items() if k not in ("params", "initial_lr")}
            for group in optimizer.param_groups]


def apply_changed_settings(optimizer: torch.optim.Optimizer, built: list[dict[str, Any]],
                           saved: OptimizerConfig, new: OptimizerConfig) -> None:
    """After a checkpoint's state is loaded into ``optimizer``: put back the group values
    ``built`` from the ``new`` settings where those differ from the ``saved`` config's.

    Nothing changes when the settings that reach the groups
    (:data:`CONSTRUCTOR_SETTINGS`) are the saved ones: every group stays as saved. Else each
    group value that differs from the loaded one is set to the built one, except a value the
    optimizer adapts as it trains (:data:`ADAPTED`, an adapted rho), which is replaced only
    when its own setting changed. The lr is the schedule's, set before each step.
    """
    changed = {name for name in CONSTRUCTOR_SETTINGS
               if _plain(getattr(saved, name, None)) != _plain(getattr(new, name))}
    for group, values in zip(optimizer.param_groups, built, strict=True):
        group.pop("initial_lr", None)  # a torch scheduler's, in formats 1 and 2
        for key, value in values.items():
            if not changed or key == "lr" or (key in ADAPTED and ADAPTED[key] not in changed):
                continue
            if value != group.get(key):
                group[key] = value


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists), to compare saved and new alike."""
    return json.loads(json.dumps(value))


def branch_off(point: ResumePoint, run_dir: Path, step: int, config: Config, *,
               is_main: bool = True, world_size: int = 1) -> bool:
    """Whether this resume, at ``step``, branches off its own folder's history: it resumes
    a checkpoint there (``stable.pt``) older than another one there (``checkpoint.pt`` of
    the run that went on; resuming checkpoint.pt itself continues the run, never branches,
    even past a ``stable.pt``). Then that newer checkpoint (and the record of its run) is
    moved aside with a copy of the log (:func:`~.rundir.set_aside`), so that the log keeps
    only this branch's rows and a later ``--resume <folder>`` continues this branch, not
    the other. Every rank learns the answer (all then save)."""
    resumed = point.path
    newer = []
    continuing = resumed.resolve() == (run_dir / CHECKPOINT).resolve()
    if is_main and point.folder.resolve() == run_dir.resolve() and not continuing:
        for name in (CHECKPOINT, STABLE_CHECKPOINT):
            path = run_dir / name
            if not path.exists() or path.resolve() == resumed.resolve():
                continue
            try:  # another file than the one resumed: its step decides
                other = train_state_of(load_checkpoint(path), config.tokens_per_step)["step"]
            except (SophiaError, KeyError):  # unreadable: not this branch's either
                other = None
            if other is None or other > step:
                newer.append(name)
    if newer:
        names = [*newer, *(["record.json"] if (run_dir / "record.json").exists() else [])]
        with writing("--out-dir", run_dir):
            aside = set_aside(run_dir, names)
        print(f"note: {resumed.name} (step {step}) is older than {newer[0]} in {run_dir}: a "
              f"new branch; the other's {', '.join(names)} and log are set aside in {aside}, "
              f"and `sophia train --resume {run_dir}` continues this one", file=sys.stderr)
    if world_size > 1:
        return distributed.mean_over_ranks(float(bool(newer))) > 0
    return bool(newer)


def describe_lr_change(step: int, old: LRSchedule, new: LRSchedule, old_lr: float,
                       new_lr: float) -> str | None:
    """What a resume at ``step`` does to the lr, or None when the new settings give the
    same lr for the steps the old ones still had to run (none shows a jump). ``old_lr``,
    ``new_lr``: the peak lr the checkpoint's and the new settings give."""
    before = old.lr(step, old_lr)
    after = new.lr(step, new_lr)
    if before == after and old == new and old_lr == new_lr:
        return None
    changed = [f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}"
               for name in ("kind", "warmup_steps", "max_steps", "decay_fraction", "min_lr_ratio")
               if getattr(old, name) != getattr(new, name)]
    if old_lr != new_lr:
        changed.insert(0, f"lr {old_lr:.3g} -> {new_lr:.3g}")
    text = (f"resuming at step {step} with {', '.join(changed)}: the lr there is {after:.3g}, "
            f"where the checkpoint's settings had {before:.3g}")
    if new.kind == "cosine" and new.max_steps != old.max_steps and before != after:
        text += ("; a longer cosine is re-stretched over the whole run, so the lr jumps here "
                 "(to extend a run without a jump, train it with --schedule wsd and resume "
                 "from its stable.pt)")
    elif before == after:
        text += " (no jump here)"
    return text


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


def _section(saved: dict[str, Any], name: str) -> Any:
    """Section ``name`` of a saved config (nested or flat), unvalidated."""
    cls = SECTIONS[name]
    values = flatten(saved)
    return cls(**{f.name: values[flat] for f in fields(cls)
                  if (flat := flat_name(f)) in values})
