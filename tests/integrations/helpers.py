"""What the integration tests share: a spy on the optimizer's refreshes, learnable token data.

The data are arithmetic sequences of tokens (start s, stride d: s, s+d, s+2d, … mod V), so a
tiny model's loss falls within a few dozen steps; some rows end in padding, whose labels are
-100 (and, for the Hugging Face model, whose attention mask is 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB = 32
LENGTH = 12
PAD = 0


@dataclass
class Refresh:
    """One call of ``update_hessian``, as the optimizer saw it."""

    steps_taken: int
    scale: float
    grad_scale: float | None
    folded: bool


@dataclass
class RefreshSpy:
    """Records every ``update_hessian`` call of one optimizer (patched on the instance)."""

    calls: list[Refresh] = field(default_factory=list)

    @classmethod
    def attach(cls, optimizer: torch.optim.Optimizer) -> RefreshSpy:
        spy = cls()
        original = optimizer.update_hessian

        def update_hessian(*args, **kwargs):
            folded = original(*args, **kwargs)
            scale = kwargs.get("scale", args[0] if args else None)
            grad_scale = kwargs.get("grad_scale")
            spy.calls.append(Refresh(
                optimizer.steps_taken(),
                float(scale) if not callable(scale) else float("nan"),
                None if grad_scale is None else float(grad_scale),
                bool(folded),
            ))
            return folded

        optimizer.update_hessian = update_hessian
        return spy


def token_rows(count: int, seed: int = 0, padded_every: int = 3) -> list[dict[str, torch.Tensor]]:
    """``count`` rows of ``input_ids``, ``attention_mask`` and ``labels`` (LENGTH tokens each):
    every ``padded_every``-th row has its last 1-4 positions padded (label -100, mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        start, stride = torch.randint(1, VOCAB, (2,), generator=generator).tolist()
        ids = 1 + (start + torch.arange(LENGTH) * (stride % 4 + 1)) % (VOCAB - 1)
        labels, attention = ids.clone(), torch.ones(LENGTH, dtype=torch.long)
        if index % padded_every == 0:
            padding = 1 + index % 4
            ids[-padding:], labels[-padding:], attention[-padding:] = PAD, -100, 0
        rows.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return rows


def hessians_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """h of every parameter that has state, in parameter order, detached copies."""
    return [optimizer.state[p]["hessian"].detach().clone()
            for group in optimizer.param_groups for p in group["params"]
            if "hessian" in optimizer.state.get(p, {})]


class TinyLM(torch.nn.Module):
    """A one-block causal transformer: ``(B, T)`` tokens → ``(B, T, VOCAB)`` logits. Attention
    goes through ``scaled_dot_product_attention``, so SophiaH's math-attention path is used."""

    def __init__(self, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.position = torch.nn.Parameter(0.02 * torch.randn(LENGTH, width))
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.mlp(x)
        return self.head(self.norm(x))


def next_token_pairs(count: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    """``(inputs, targets)`` pairs from :func:`token_rows`: tokens 0..T-2 and the labels of
    tokens 1..T-1 (-100 at padding)."""
    rows = token_rows(count, seed)
    inputs = torch.stack([row["input_ids"][:-1] for row in rows])
    targets = torch.stack([row["labels"][1:] for row in rows])
    return torch.utils.data.TensorDataset(inputs, targets)


def run_ddp_worker(framework: str, folder: Path, timeout: float = 300) -> list[dict]:
    """Run ``ddp_worker.py`` on 2 gloo ranks under torchrun; return what each rank saved."""
    repository = Path(__file__).resolve().parents[2]  # -m finds tests.* from here
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "tests.integrations.ddp_worker", framework,
               str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd=repository, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
