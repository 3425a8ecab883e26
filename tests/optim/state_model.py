"""A small classifier, its batches and a training loop with Sophia's refresh, shared by the
optimizer-state tests (bf16 and 8-bit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import sophia_pytorch


def small_model(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(),
                                torch.nn.Linear(40, 5))
    return model.to(dtype)


def small_batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(64, 12, generator=generator).to(dtype),
            torch.randint(0, 5, (64,), generator=generator))


def train(model, optimizer, steps, dtype, *, hutchinson: bool = False) -> float:
    loss = torch.tensor(0.0)
    for t in steps:
        inputs, targets = small_batch(t, dtype)
        if optimizer.hessian_due():
            if hutchinson:
                optimizer.update_hessian(lambda x=inputs, y=targets: F.cross_entropy(model(x), y),
                                         generator=torch.Generator().manual_seed(t))
            else:
                optimizer.zero_grad()
                sampled, n = sophia_pytorch.sampled_cross_entropy(
                    model(inputs), generator=torch.Generator().manual_seed(t))
                sampled.backward()
                optimizer.update_hessian(scale=n)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs).float(), targets)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def two_groups(model: torch.nn.Module) -> list[dict]:
    first, second = list(model.children())[0], list(model.children())[2]
    return [{"params": list(first.parameters())},
            {"params": list(second.parameters()), "lr": 5e-3, "weight_decay": 0.0}]
