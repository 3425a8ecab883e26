"""The README: its code runs as written, its commands exist, and it stays a product page.

The plain loop runs on the model and data of ``examples/plain_loop.py`` (the model the README
names when it says its ρ keeps the unclipped fraction in 0.1-0.5), so that claim is checked
where it is made.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sophia_pytorch import SophiaG
from sophia_pytorch.harness.cli import _parse_args

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)


def _inline_code() -> list[str]:
    """Every `inline code` span, a line break inside one read as a space (as Markdown does)."""
    spans = re.sub(r"```.*?```", "", TEXT, flags=re.DOTALL)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", spans)]


def _example():
    path = ROOT / "examples" / "plain_loop.py"
    spec = importlib.util.spec_from_file_location("example_plain_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_short_and_opens_with_code() -> None:
    lines = TEXT.splitlines()
    assert len(lines) <= 200
    assert next(i for i, line in enumerate(lines, 1) if line.startswith("```")) <= 30


def test_the_plain_loop_learns_with_its_rho_in_the_unclipped_band() -> None:
    example = _example()
    block = next(b for b in _python_blocks() if "SophiaG(" in b)
    assert f"rho={example.HYPERPARAMETERS['rho']}" in block  # the rho the example checks
    torch.manual_seed(0)
    text = example.zen_of_python()
    alphabet = sorted(set(text))
    data = torch.tensor([alphabet.index(c) for c in text])
    model = example.TinyCharLM(len(alphabet), context=32)
    stream = example.batches(data, 32, 16, torch.Generator().manual_seed(0))
    loader = [batch for _, batch in zip(range(200), stream)]

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                       for x, y in loader[:20]) / 20

    before = mean_loss()
    namespace = {"model": model, "loader": loader}
    exec(compile(block, str(README), "exec"), namespace)
    optimizer = namespace["optimizer"]
    assert optimizer.steps_taken() == 200
    assert mean_loss() < 0.5 * before
    low, high = example.UNCLIPPED_BAND
    assert low <= optimizer.unclipped_fraction() <= high


@pytest.mark.parametrize("head", ["sampled_gaussian_nll", "sampled_binary_cross_entropy"])
def test_the_other_heads_refresh_the_hessian_as_written(head: str) -> None:
    block = next(b for b in _python_blocks() if "sampled_gaussian_nll(" in b)
    if head == "sampled_binary_cross_entropy":  # the block's alternative line, swapped in
        block = re.sub(r"\n(\s*)loss, num_samples = sampled_gaussian_nll\(.*\)", "", block)
        block = block.replace("# loss, num_samples = sampled_binary",
                              "loss, num_samples = sampled_binary")
    assert f"{head}(" in block
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = SophiaG(model.parameters(), refresh_every=1)
    inputs = torch.randn(8, 4)
    F.mse_loss(model(inputs), torch.zeros(8, 3)).backward()
    optimizer.step()
    optimizer.zero_grad()
    namespace = {"model": model, "optimizer": optimizer, "inputs": inputs}
    exec(compile(block, str(README), "exec"), namespace)
    assert optimizer.refreshes_done() == 1
    for param in model.parameters():
        assert param.grad is None
        assert float(optimizer.state[param]["hessian"].min()) > 0


def test_every_sophia_command_in_the_readme_parses() -> None:
    commands = [c for c in _inline_code() if c.startswith("sophia ")]
    for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.DOTALL):
        commands += [line.split("#")[0].strip() for line in block.splitlines()
                     if line.startswith("sophia ")]
    assert len(commands) >= 5
    for command in commands:
        _parse_args(shlex.split(command)[1:])  # raises on an unknown flag or subcommand


def test_every_script_and_make_target_the_readme_names_exists() -> None:
    paths = re.findall(r"\b((?:examples|benchmarks|experiments)/[\w/.-]+\.py)\b", TEXT)
    assert paths and [p for p in paths if not (ROOT / p).is_file()] == []
    modules = re.findall(r"python -m (benchmarks\.[\w.]+)", " ".join(_inline_code()))
    assert modules and all((ROOT / m.replace(".", "/") / "__main__.py").is_file()
                           for m in modules)
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert set(re.findall(r"\bmake (\w+)", TEXT)) <= targets
    links = re.findall(r"\]\(([^)#]+)\)", TEXT)
    assert [link for link in links if not (ROOT / link).exists()] == []
