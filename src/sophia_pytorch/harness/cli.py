"""The ``sophia`` command: ``sophia train``, ``sophia compare``, ``sophia presets``.

Every :class:`~.config.Config` setting is a flag by its flat name (``n_layer`` ->
``--n-layer``); values given on the command line override a ``--config`` TOML file, which
overrides the preset.
User errors print one line, ``error: <problem>; <fix>``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

from .config import _RENAMED as RENAMED
from .config import (
    FLAT,
    OPTIMIZERS,
    PRESETS,
    ROW_FIELDS,
    SECTIONS,
    coerce,
    field_doc,
    field_type,
    flatten,
    load_toml,
    make_config,
    optimizer_names,
    to_dict,
)
from .errors import Interrupted, SophiaError, did_you_mean, os_error_message

__all__ = ["main"]

# compare sets these itself: each optimizer its own preset row, the seeds, the folders.
_COMPARE_OWN = ("optimizer", *ROW_FIELDS, "seed", "out_dir")
_MAX_SEEDS = 1000
_TOML_HELP = "TOML settings: [model], [data], [optimizer], [run] tables, or flat key = value"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), in the same form as SophiaError's,
    and no abbreviated flags (``--lr`` must not quietly mean ``--lr-grid``). ``commands``:
    the subcommands' parsers by name (the top-level parser's), for their flags' names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)", message)
        if choice:  # a mistyped subcommand
            message += did_you_mean(choice[1], re.findall(r"'([^']*)'", choice[2]))
        raise SophiaError(f"{message}; see `{self.prog} --help`")


def _flag(name: str) -> str:
    """The command-line flag of flat setting ``name`` (``block_size`` -> ``--block-size``)."""
    return "--" + name.replace("_", "-")


def _choices(name: str) -> tuple[str, ...]:
    """The values flat setting ``name`` may take, or () for a free value."""
    if name == "optimizer":
        return optimizer_names()
    section, attribute = FLAT[name]
    field = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == attribute)
    return tuple(field.metadata.get("choices") or ())


def _help(name: str) -> str:
    """The setting's doc, with its choices spelled out (``--optimizer``: every name)."""
    doc = "the optimizer" if name == "optimizer" else field_doc(name)
    choices = _choices(name)
    return f"{doc}; one of {', '.join(choices)}" if choices else doc


def _from_flag(name: str, value: str) -> Any:
    """A command-line value converted to the setting's type; errors name the flag."""
    choices = _choices(name)
    if choices and value not in choices:
        raise SophiaError(f"unknown {name.replace('_', ' ')} {value!r}"
                          f"{did_you_mean(value, choices)} in {_flag(name)}; choose one of "
                          f"{', '.join(choices)}")
    try:
        return coerce(name, value)
    except SophiaError:
        raise SophiaError(f"bad value {value!r} for {_flag(name)}: expected "
                          f"{field_type(name).__name__}") from None


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("settings (override the preset and --config)")
    tiny = flatten(to_dict(make_config("tiny")))
    for name in FLAT:
        if name in (*skip, "sophia_options"):
            continue
        flag = _flag(name)
        default = ("the preset's row for the optimizer" if FLAT[name][1] in ROW_FIELDS
                   else f"tiny: {tiny[name]!r}")
        text = f"({default}) {_help(name)}".replace("%", "%%")
        if field_type(name) is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        else:
            group.add_argument(flag, dest=name, default=None, metavar="VALUE", help=text)
    group.add_argument("--sophia-option", dest="sophia_option", action="append",
                       metavar="KEY=VALUE", default=None,
                       help="a SophiaG/SophiaH constructor keyword, VALUE a TOML literal "
                            "(bias_correction=true, eps=1e-12); repeatable")


def _build_parser() -> _Parser:
    parser = _Parser(prog="sophia", description="Train a GPT with Sophia and compare optimizers.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train one model",
                                description="Train a GPT; writes log.jsonl and checkpoint.pt.")
    train.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (tiny)")
    train.add_argument("--config", dest="config_file", metavar="FILE.toml",
                       help=_TOML_HELP)
    train.add_argument("--resume", metavar="PATH",
                       help="continue from a run folder or checkpoint.pt (keeps its settings; "
                            "flags given change what can change, the rest is refused)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out-dir if it holds one (default: refuse)")
    _add_config_flags(train)

    compare = commands.add_parser(
        "compare", help="compare optimizers side by side",
        description="Train the same GPT with several optimizers (same data order and seeds) "
                    "and write report.md, results.json and plots.")
    compare.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (tiny)")
    compare.add_argument("--config", dest="config_file", metavar="FILE.toml", help=_TOML_HELP)
    compare.add_argument("--optimizers", default="sophiag,adamw",
                         help=f"comma-separated, each once, from "
                              f"{', '.join(optimizer_names())} (sophiag,adamw)")
    compare.add_argument("--lr-grid", default="1",
                         help="comma-separated multipliers of each optimizer's preset lr; the "
                              "best (lowest final val loss, first seed) is kept (1). There is "
                              "no --lr, --min-lr, --beta1, --beta2, --weight-decay or --rho "
                              "(nor in --config): each optimizer takes its own preset row")
    compare.add_argument("--seeds", default="1", help="seeds per optimizer at its best lr (1)")
    compare.add_argument("--seed", default="0", help="first seed (0)")
    compare.add_argument("--out", default=None,
                         help="comparison folder (runs/compare-<preset>-<time>); finished runs "
                              "found in it with the same settings are reused")
    compare.add_argument("--overwrite", action="store_true",
                         help="retrain runs whose folder holds a run with other settings")
    _add_config_flags(compare, skip=_COMPARE_OWN)

    presets = commands.add_parser("presets", help="list the presets and their optimizer settings")
    parser.commands = {"train": train, "compare": compare, "presets": presets}
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """argparse's parse, with a "did you mean" for a mistyped flag."""
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser.commands[args.command]
        flags = [s for action in command._actions for s in action.option_strings]
        typed = next((e.partition("=")[0] for e in extra if e.startswith("--")), "")
        renamed = RENAMED.get(typed[2:].replace("-", "_"))
        hint = (f" ({typed} is now {_flag(renamed)})" if renamed
                else did_you_mean(typed, flags) if typed else "")
        raise SophiaError(f"unrecognized arguments: {' '.join(extra)}{hint}; see "
                          f"`{command.prog} --help`")
    return args


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """TOML values, then command-line flags on top; unset flags are left out (flat names).
    Under ``compare``, a row field in the TOML is refused as its flag is (each optimizer
    takes its own preset row)."""
    values: dict[str, Any] = load_toml(args.config_file) if args.config_file else {}
    if args.command == "compare":
        from .compare.runner import refuse_shared_rows

        refuse_shared_rows(values, where=f"--config {args.config_file}")
    for name in FLAT:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = _from_flag(name, given) if isinstance(given, str) else given
    if getattr(args, "sophia_option", None):
        values["sophia_options"] = {**values.get("sophia_options", {}),
                                    **_parse_options(args.sophia_option)}
    if args.preset is not None:
        values["preset"] = args.preset
    return values


def _parse_options(items: list[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` with TOML literal values, as a dict."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            options[key.strip()] = tomllib.loads(f"value = {text}")["value"]
        except (ValueError, tomllib.TOMLDecodeError):
            raise SophiaError(
                f"bad --sophia-option {item!r}: write KEY=VALUE with VALUE a TOML literal "
                "(1e-3, true, [0.1, 0.5], \"text\")"
            ) from None
    return options


def _parse_list(text: str, kind: type, name: str) -> list:
    """``"a,b"`` as ``[kind("a"), kind("b")]``; an empty item (``a,,b``, a trailing comma) or
    a value ``kind`` refuses is a SophiaError naming the flag ``name``."""
    if not text.strip():
        raise SophiaError(f"{name} is empty; give at least one value")
    texts = [item.strip() for item in text.split(",")]
    if "" in texts:
        raise SophiaError(f"{name} {text!r} has an empty item (two commas in a row, or one at "
                          f"an end); write the values separated by single commas")
    try:
        return [kind(item) for item in texts]
    except ValueError:
        raise SophiaError(f"bad {name} {text!r}: expected comma-separated {kind.__name__}s") \
            from None


def _optimizer_list(text: str) -> list[str]:
    """``--optimizers``: known names, each once; an unknown one gets a "did you mean"."""
    names = _parse_list(text, str, "--optimizers")
    for name in names:
        if name not in optimizer_names():
            raise SophiaError(f"unknown optimizer {name!r}{did_you_mean(name, optimizer_names())}"
                              f" in --optimizers; choose from {', '.join(optimizer_names())}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise SophiaError(f"--optimizers names {', '.join(twice)} twice; name each optimizer "
                          "once (--lr-grid and --seeds give it more runs)")
    return names


def _run_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .resume import ResumePoint, resume_settings
    from .trainer import is_main_process, train

    overrides = _overrides(args)
    resume = ResumePoint.read(args.resume) if args.resume else None  # read once, passed on
    if resume is not None:
        overrides = resume_settings(resume, overrides)
    config = make_config(overrides.pop("preset", "tiny"), overrides)
    try:
        result = train(config, resume=resume, overwrite=args.overwrite)
        if not is_main_process():  # under torchrun, rank 0 reports
            return 0
    finally:
        distributed.destroy()
    print(f"done: {result.steps} steps, final val loss {result.final_val_loss:.4f}, "
          f"{result.train_seconds:.1f} s of training, {result.skipped_steps} skipped steps")
    print(f"run folder: {result.run_dir} (log.jsonl, checkpoint.pt)")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from .compare.runner import compare, default_out_dir

    overrides = _overrides(args)
    optimizers = _optimizer_list(args.optimizers)
    base = make_config(overrides.pop("preset", "tiny"), overrides)
    out = Path(args.out) if args.out else default_out_dir(base.preset)
    num_seeds = _parse_list(args.seeds, int, "--seeds")[0]
    if not 1 <= num_seeds <= _MAX_SEEDS:  # checked before the list is built
        raise SophiaError(f"--seeds {num_seeds}: a comparison trains one run per seed; give "
                          f"1 to {_MAX_SEEDS}")
    first_seed = _parse_list(args.seed, int, "--seed")[0]
    try:
        summary = compare(
            base, optimizers=optimizers,
            lr_multipliers=_parse_list(args.lr_grid, float, "--lr-grid"),
            seeds=[first_seed + i for i in range(num_seeds)],
            out_dir=out, overrides=overrides, overwrite=args.overwrite,
        )
    except (Interrupted, KeyboardInterrupt) as exc:
        # A run's own advice (`sophia train --resume`) would leave the comparison unfinished.
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        raise Interrupted(
            f"{signal.Signals(signum).name}: comparison stopped; finished runs and the "
            f"interrupted run's last checkpoint are kept: run the same `sophia compare` "
            f"command with --out {out} to continue", signum) from None
    print(summary.headline)
    print(f"report: {summary.report_path}")
    print(f"plots:  {', '.join(str(p) for p in summary.plot_paths)}")
    return 0


def _run_presets() -> int:
    print("optimizers:")
    for name, spec in OPTIMIZERS.items():
        print(f"  {name:16s} {spec.description}")
    for name, preset in PRESETS.items():
        print(f"{name}: {preset.description}")
        for optimizer, hp in preset.optimizers.items():
            rho = f" rho={hp.rho:g}" if OPTIMIZERS[optimizer].refresh is not None else ""
            print(f"  {optimizer:16s} lr={hp.lr:g} min_lr={hp.min_lr:g} betas={hp.betas} "
                  f"wd={hp.weight_decay}{rho}")
    for name, spec in OPTIMIZERS.items():
        if spec.row != name:
            print(f"variant {name}: {spec.row}'s row, constructor keywords {spec.extra()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sophia`` console script; returns the exit status."""
    try:
        args = _parse_args(argv)
        if args.command == "train":
            return _run_train(args)
        if args.command == "compare":
            return _run_compare(args)
        return _run_presets()
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except SophiaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a read-only folder that no writer above caught
        message = os_error_message(exc, "--out-dir (--out for compare) or --cache-dir")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training began (or after it ended): nothing to save
        print("interrupted before training; nothing of this run was saved: run the same "
              "command again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
