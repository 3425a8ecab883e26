"""The README's usage examples run as written, on a tiny model, and reduce the loss."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 16, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def _copy_task(num_batches: int, generator: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """Predict (token + 1) mod 16: learnable by the tiny model."""
    batches = []
    for _ in range(num_batches):
        inputs = torch.randint(0, 16, (8, 12), generator=generator)
        batches.append((inputs, (inputs + 1) % 16))
    return batches


def _mean_loss(model: torch.nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches
        ) / len(batches)


def test_readme_sophiag_loop_runs_and_learns() -> None:
    block = next(b for b in _python_blocks() if "SophiaG(" in b)
    torch.manual_seed(0)
    model = _TinyLM()
    loader = _copy_task(200, torch.Generator().manual_seed(0))
    before = _mean_loss(model, loader[:20])
    namespace = {"model": model, "loader": loader}
    exec(compile(block.replace("lr=6e-4", "lr=3e-2"), str(README), "exec"), namespace)
    optimizer = namespace["optimizer"]
    assert optimizer.steps_taken() == 200
    assert all(float(optimizer.state[p]["hessian"].abs().sum()) > 0 for p in model.parameters())
    assert _mean_loss(model, loader[:20]) < 0.5 * before
