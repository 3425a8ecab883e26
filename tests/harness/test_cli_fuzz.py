"""Every flag of ``sophia train`` and ``sophia compare`` fed strings, numbers, huge,
negative, NaN and infinite values: never a traceback, never exit 0 with a non-finite result.

In-process through ``main([...])`` on a tiny model with one step, a fixed random seed, and a
budget of batches per command (a value that asks for a long run is stopped by the budget,
which is not a failure).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
from pathlib import Path

import pytest
import torch

from sophia_pytorch.harness import cli
from sophia_pytorch.harness.checkpoint import load_checkpoint
from sophia_pytorch.harness.data import BatchSampler
from tests.harness.helpers import corpus_slice

NON_FINITE = ["nan", "inf", "-inf", "1e400", "-1e400"]
OTHERS = ["0", "-1", "1", "3", "2.5", "-0.5", "1e18", "-1e18", str(2**64), str(-2**63 - 1),
          "1e-300", "", " ", "abc", "true", "1,2", "[1]", "x=1", "nan,inf", "\u00e9\u00e8",
          "0x10", "1_000"]
BATCH_BUDGET = 40  # training and validation batches one command may draw
VALUES_PER_FLAG = 4  # besides one non-finite value each


class _OutOfBudget(KeyboardInterrupt):
    """Raised by the test's batch budget; main() reports it like a Ctrl-C (exit 130)."""


def _random_text(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + ".,:;=_-+ @#%^&*()[]{}'\""
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))


def _flags(command: str) -> list[str]:
    parser = cli._build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(option for action in sub.choices[command]._actions
                  for option in action.option_strings
                  if option.startswith("--") and option != "--help")


def _cases(command: str, rng: random.Random) -> list[tuple[str, str]]:
    cases = []
    for flag in _flags(command):
        values = [rng.choice(NON_FINITE), *rng.sample(OTHERS, VALUES_PER_FLAG - 1),
                  _random_text(rng)]
        cases += [(flag, value) for value in values]
    return cases


def _base(command: str, folder: Path, data: Path, cache: Path) -> list[str]:
    out = ["--out-dir", str(folder)] if command == "train" else \
        ["--out", str(folder), "--optimizers", "adamw"]
    return [command, "--data", str(data), "--cache-dir", str(cache), "--n-layer", "1",
            "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2",
            "--max-steps", "1", "--eval-every", "1", "--eval-batches", "1", "--no-progress",
            *out]


def _strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f"{constant} in JSON output")

    return json.loads(text, parse_constant=refuse)


def _assert_finite_result(command: str, out: str) -> None:
    """What an exit status of 0 promises: finite losses and weights."""
    if command == "train":
        folder = Path(out.split("run folder: ")[1].split(" (")[0])
        rows = [_strict_json(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        evals = [row["val_loss"] for row in rows if row["kind"] == "eval"]
        assert all(v is not None and math.isfinite(v) for v in evals), evals
        state = load_checkpoint(folder)
        assert all(torch.isfinite(t).all() for t in state["model"].values())
    else:
        report = Path(out.split("report: ")[1].splitlines()[0])
        results = _strict_json((report.parent / "results.json").read_text())
        for name, row in results["headline"]["optimizers"].items():
            assert row["final_val_loss"] is not None, name
            assert math.isfinite(row["final_val_loss"]["mean"]), name


@pytest.mark.parametrize("command", ["train", "compare"])
def test_every_flag_with_hostile_values_is_an_error_or_a_finite_result(tmp_path, monkeypatch,
                                                                      capsys, command):
    rng = random.Random(f"sophia-cli-fuzz-{command}")
    data = corpus_slice(tmp_path / "data")
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)  # relative paths among the values land here
    monkeypatch.setenv("SOPHIA_CACHE", str(tmp_path / "default-cache"))
    drawn = {"n": 0}
    real_get = BatchSampler.get

    def budgeted_get(self, index):
        drawn["n"] += 1
        if drawn["n"] > BATCH_BUDGET:
            raise _OutOfBudget
        return real_get(self, index)

    monkeypatch.setattr(BatchSampler, "get", budgeted_get)
    threads = torch.get_num_threads()
    outcomes = {0: 0, 2: 0, 130: 0}
    try:
        for number, (flag, value) in enumerate(_cases(command, rng)):
            drawn["n"] = 0
            argv = [*_base(command, tmp_path / f"out{number}", data, cache), f"{flag}={value}"]
            status = cli.main(argv)  # any exception escaping main fails the test
            captured = capsys.readouterr()
            where = f"{flag}={value!r}: status {status}\n{captured.err[-2000:]}"
            assert status in outcomes, where
            assert "Traceback" not in captured.err, where
            if status == 2:
                last = captured.err.splitlines()[-1]
                assert last.startswith("error: ") and len(last) > len("error: ") + 10, where
            elif status == 130:
                assert drawn["n"] > BATCH_BUDGET, where  # only the test's budget may stop it
            else:
                _assert_finite_result(command, captured.out)
            outcomes[status] += 1
    finally:
        torch.set_num_threads(threads)
    assert outcomes[0] > 0 and outcomes[2] > 0  # the values both pass and fail somewhere
