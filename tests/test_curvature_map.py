"""experiments/curvature_map.py: its batched update rules are the optimizers they
stand for, and its quick map shows gradient descent slowing with κ where Sophia need not."""

from __future__ import annotations

import math

import pytest
import torch

import sophia_pytorch
from experiments import curvature_map as curvature_map_module
from sophia_pytorch.harness.baselines.lion import Lion


@pytest.fixture(scope="module")
def curvature_map():
    return curvature_map_module


def _small_softmax(curvature_map):
    return curvature_map.softmax_problem(100.0, rotated=False, noisy=True, n=64, d=4,
                                         classes=3, batch=8, seed=0)


def _reference(name: str, params: list[torch.Tensor], config: dict) -> torch.optim.Optimizer:
    """The optimizer class each batched rule stands for."""
    if name == "GD":
        return torch.optim.SGD(params, lr=config["lr"])
    if name == "GD+momentum":
        return torch.optim.SGD(params, lr=config["lr"], momentum=0.9)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.0)
    if name == "Lion":
        return Lion(params, lr=config["lr"])
    cls = sophia_pytorch.SophiaG if name == "Sophia-G" else sophia_pytorch.SophiaH
    return cls(params, lr=config["lr"], rho=config["rho"], weight_decay=0.0,
               betas=(0.965, 0.99), refresh_every=3, refresh_at_start=True,
               bias_correction=True, foreach=False, fused=False)


@pytest.mark.parametrize("name", ["GD", "GD+momentum", "AdamW", "Lion", "Sophia-G", "Sophia-H"])
def test_batched_rule_follows_the_optimizer_class(curvature_map, name):
    """Ten minibatch steps (three Hessian refreshes for Sophia) of the batched rule equal those
    of torch's / sophia_pytorch's optimizer class, driven by autograd, on the same draws."""
    problem = _small_softmax(curvature_map)
    config = dict(lr=0.05, rho=0.1)
    start = problem.start + 0.1

    x = start[None].clone()
    batched = curvature_map.BatchedOptimizer(name, [config], x, refresh_every=3)
    draws, probes = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for _ in range(10):
        batch = problem.draw(draws)
        if batched.hessian_due():
            curvature_map.refresh(batched, problem, x, batch, probes)
        batched.step(x, problem.gradient(x, batch))

    w = start.clone().requires_grad_(True)
    optimizer = _reference(name, [w], config)
    draws, probes = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for _ in range(10):
        batch = problem.draw(draws)
        if name.startswith("Sophia") and optimizer.hessian_due():
            if name == "Sophia-G":
                optimizer.zero_grad()
                sampled, count = sophia_pytorch.sampled_cross_entropy(
                    problem.logits(w[None], batch)[0], generator=probes)
                sampled.backward()
                optimizer.update_hessian(scale=count)
            else:
                optimizer.update_hessian(lambda b=batch: problem.loss(w[None], b)[0],
                                         generator=probes)
        optimizer.zero_grad()
        problem.loss(w[None], batch)[0].backward()
        optimizer.step()

    assert not torch.equal(w.detach(), start)
    torch.testing.assert_close(x[0], w.detach(), rtol=1e-10, atol=1e-12)


def test_f_star_is_the_minimum(curvature_map):
    """f* of a rotated softmax problem: the Newton run's gradient norm is ~0, and 200 steps of
    gradient descent from the start stay above it."""
    problem = curvature_map.softmax_problem(1e4, rotated=True, noisy=False, n=64, d=4,
                                            classes=3, batch=64, seed=0)
    assert problem.info["f_star_grad_norm"] < 1e-10
    assert problem.f_star > 0
    # A long plain run from the start cannot go below f*.
    x = problem.start[None].clone()
    for _ in range(200):
        x -= 1e-4 * problem.gradient(x, None)
    assert float(problem.objective(x)[0]) >= problem.f_star - 1e-12


@pytest.mark.slow  # 17 s at load 5 on the 2-core VM; minutes when it is loaded
def test_quick_map(curvature_map, tmp_path):
    """The quick map has every optimizer, and on the separable family gradient descent needs
    more steps at κ = 10⁴ than at κ = 10 (a capped run counts as more than the cap)."""
    results = curvature_map.main(["--quick", "--families", "separable", "softmax",
                                  "--variants", "full", "--n", "64", "--out", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    for name in curvature_map.OPTIMIZERS:
        assert f"| {name} |" in table
    assert (tmp_path / "curvature_map.png").stat().st_size > 10_000

    def steps(family: str, name: str, kappa: float) -> float:
        (row,) = [r for r in results if (r["family"], r["optimizer"], r["kappa"])
                  == (family, name, kappa)]
        found = row["best"]["0.01"]["steps"]
        return math.inf if found is None else found

    assert steps("separable", "GD", 1e4) > steps("separable", "GD", 1e1)
    assert steps("separable", "GD", 1e1) < math.inf
    assert steps("separable", "Sophia-H", 1e4) < math.inf
