"""Curvature map: steps to reach f* + ε against the condition number κ.

The paper's theorem says Sophia's runtime does not depend on the condition number. This script
measures it, beside gradient descent, heavy-ball momentum, AdamW and Lion, on three families of
small d-dimensional problems whose curvature at the optimum spans κ ∈ {10, …, 10⁶}:

* ``separable``: f(x) = Σᵢ φᵢ(aᵢ(xᵢ − cᵢ)) with aᵢ² log-spaced over [1, κ], so the Hessian at
  the optimum is diag(aᵢ²). φ alternates between log cosh z (curvature sech² z: flat far from
  the optimum, 1 at it) and z²/2 + z⁴/4 (curvature 1 + 3z²: steep far away, 1 at it), so the
  curvature along the path differs from the curvature at the end by 10²–10³ either way, in the
  spirit of the paper's two-dimensional illustration. Every run starts at aᵢ(xᵢ − cᵢ) = ±3,
  the same point in natural units whatever κ: a method invariant to rescaling the coordinates
  (Newton) would need the same steps for every κ. f* = 0 exactly. No softmax, so no Sophia-G.
* ``softmax``: multinomial logistic regression, W ∈ R^{C×d}, on n synthetic examples whose
  feature j has scale σⱼ, σⱼ² log-spaced over [1, κ] (the curvature of the weights of feature j
  scales as σⱼ²); labels drawn from a teacher's softmax, so the optimum is finite. f* by a
  float64 Newton run to a gradient norm below 1e-11.
* ``rotated``: the same data times a random orthogonal d×d matrix: the same spectrum, but the
  Hessian is no longer close to diagonal, so no diagonal preconditioner should help.

Each family runs full batch (the exact gradient; Sophia-G's labels are still sampled, Sophia-H's
probe is still random) and in a noisy variant: minibatches of ``--batch`` examples drawn with
replacement for the softmax families; for the separable family a linear perturbation ⟨ξ, x⟩
with ξᵢ ~ N(0, (σ_noise·aᵢ)²) added to the loss (gradient noise σ_noise in natural units, the
Hessian unchanged). Progress is always measured on the exact f.

Every optimizer's lr (and Sophia's ρ) is tuned per problem on a log grid; the score is the
fewest steps to the first t with f(x_t) − f* ≤ ε, over the grid, capped at ``--cap`` ("> cap"
when no grid point got there). A grid's configurations run side by side, stacked along a
leading dimension (one Python step for all of them); the run records every ε at once and ends
when each ε has been reached by some configuration, at the cap, or when all have diverged.
Sophia is the package's own update and refresh functions (``sophia_update``, the EMA updates,
``sampled_cross_entropy``, ``hutchinson_estimate``), which the tests check step by step against
SophiaG/SophiaH: weight_decay 0, betas (0.965, 0.99) (``--sophia-beta1``), a Hessian refresh
every ``--refresh-every`` steps with ``refresh_at_start`` and ``bias_correction`` (so that ρ
means the same early and late). Everything is float64 on the CPU with one thread.

Usage::

    python experiments/curvature_map.py --out runs/curvature_map            # the full map
    python experiments/curvature_map.py --quick --out /tmp/cm               # seconds, for tests
    # on a shared machine, one process per family and variant, then one table and plot:
    python experiments/curvature_map.py --families softmax --variants noisy --out runs/cm/sn
    python experiments/curvature_map.py --merge runs/cm/*/results.json --out runs/cm/all

Writes ``table.md``, ``results.json`` and ``curvature_map.png`` into ``--out`` and prints the
table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import sophia_pytorch
from sophia_pytorch import functional

OPTIMIZERS = ("GD", "GD+momentum", "AdamW", "Lion", "Sophia-G", "Sophia-H")
FAMILIES = ("separable", "softmax", "rotated")
VARIANTS = ("full", "noisy")


# ----------------------------------------------------------------------------------------------
# Problems


@dataclass
class Problem:
    """One problem instance: a start, an exact objective, a (possibly noisy) training loss.

    Every function takes a stack of K points ``x`` of shape (K, *start.shape) and answers
    for each: ``loss(x, batch)`` (K,) is the training loss on a draw ``batch =
    draw(generator)`` (None: full batch), differentiable by autograd (Sophia-H's
    Hessian-vector products); ``gradient(x, batch)`` its gradient in closed form (the hot
    loop); ``objective(x)`` (K,) the exact f whose gap to ``f_star`` is measured; ``logits``
    (K, B, C), for softmax problems only (Sophia-G's sampled-label refresh).
    """

    family: str
    variant: str
    kappa: float
    start: Tensor
    objective: Callable[[Tensor], Tensor]
    loss: Callable[[Tensor, object], Tensor]
    gradient: Callable[[Tensor, object], Tensor]
    draw: Callable[[torch.Generator], object]
    f_star: float
    logits: Callable[[Tensor, object], Tensor] | None = None
    info: dict = field(default_factory=dict)


def _log_spaced(kappa: float, d: int) -> Tensor:
    """d values log-spaced over [1, κ], float64, shape (d,)."""
    return torch.logspace(0.0, math.log10(kappa), d, dtype=torch.float64)


def separable_problem(kappa: float, *, d: int, noisy: bool, noise: float, seed: int) -> Problem:
    """f(x) = Σᵢ φᵢ(aᵢ(xᵢ − cᵢ)), aᵢ² over [1, κ]; φ alternates log cosh and z²/2 + z⁴/4."""
    gen = torch.Generator().manual_seed(seed)
    scale = _log_spaced(kappa, d).sqrt()
    center = torch.randn(d, generator=gen, dtype=torch.float64)
    signs = torch.randint(0, 2, (d,), generator=gen).to(torch.float64) * 2 - 1
    start = center + 3.0 * signs / scale
    is_logcosh = torch.arange(d) % 2 == 0

    def objective(x: Tensor) -> Tensor:
        z = scale * (x - center)
        # log cosh z = |z| + log1p(e^{-2|z|}) - log 2, exact and overflow-free.
        logcosh = z.abs() + torch.log1p(torch.exp(-2 * z.abs())) - math.log(2.0)
        quartic = z * z / 2 + z ** 4 / 4
        return torch.where(is_logcosh, logcosh, quartic).sum(-1)

    def draw(generator: torch.Generator) -> Tensor | None:
        if not noisy:
            return None
        return noise * scale * torch.randn(d, generator=generator, dtype=torch.float64)

    def loss(x: Tensor, batch: object) -> Tensor:
        value = objective(x)
        return value if batch is None else value + (batch * x).sum(-1)

    def gradient(x: Tensor, batch: object) -> Tensor:
        z = scale * (x - center)
        slope = torch.where(is_logcosh, torch.tanh(z), z + z ** 3)
        return scale * slope if batch is None else scale * slope + batch

    return Problem("separable", "noisy" if noisy else "full", kappa, start, objective, loss,
                   gradient, draw, 0.0, info=dict(d=d))


def _newton_minimum(objective: Callable[[Tensor], Tensor], start: Tensor, null: Tensor,
                    *, tol: float = 1e-11, max_iter: int = 100) -> tuple[Tensor, float, float]:
    """Minimise a convex ``objective`` by damped Newton in float64; return (x*, f*, |∇f(x*)|).

    ``null`` (n × n) is added to the Hessian: the projector onto the directions the objective
    does not depend on (softmax's class shift), so the solve is regular and the gradient,
    orthogonal to them, is unaffected.
    """
    x = start.detach().clone()
    shape = x.shape
    flat_objective = lambda v: objective(v.reshape(shape))
    for _ in range(max_iter):
        v = x.reshape(-1).requires_grad_(True)
        value = flat_objective(v)
        (grad,) = torch.autograd.grad(value, v)
        if grad.norm() < tol:
            break
        hessian = torch.autograd.functional.hessian(flat_objective, v.detach())
        direction = torch.linalg.solve(hessian + null, grad)
        step = 1.0
        with torch.no_grad():
            while step > 1e-12:
                candidate = v - step * direction
                if flat_objective(candidate) <= value - 1e-4 * step * (grad @ direction):
                    break
                step /= 2
            x = candidate.reshape(shape).detach()
    v = x.reshape(-1).requires_grad_(True)
    value = flat_objective(v)
    (grad,) = torch.autograd.grad(value, v)
    return x.detach(), float(value.detach()), float(grad.norm())


def softmax_problem(kappa: float, *, rotated: bool, noisy: bool, n: int, d: int, classes: int,
                    batch: int, seed: int) -> Problem:
    """Softmax regression on features of scales σⱼ, σⱼ² over [1, κ]; optionally rotated."""
    gen = torch.Generator().manual_seed(seed)
    feature_scale = _log_spaced(kappa, d).sqrt()
    raw = torch.randn(n, d, generator=gen, dtype=torch.float64)
    teacher = torch.randn(classes, d, generator=gen, dtype=torch.float64) * 2.0 / math.sqrt(d)
    labels = torch.multinomial(torch.softmax(raw @ teacher.T, dim=1), 1, generator=gen)[:, 0]
    features = raw * feature_scale
    if rotated:
        rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        features = features @ rotation

    def logits(w: Tensor, rows: object) -> Tensor:
        x = features if rows is None else features[rows]
        return torch.einsum("bd,kcd->kbc", x, w)

    def loss(w: Tensor, rows: object) -> Tensor:
        y = labels if rows is None else labels[rows]
        scores = logits(w, rows)
        return F.cross_entropy(scores.transpose(1, 2), y.expand(scores.shape[0], -1),
                               reduction="none").mean(1)

    def objective(w: Tensor) -> Tensor:
        return loss(w, None)

    def gradient(w: Tensor, rows: object) -> Tensor:
        x = features if rows is None else features[rows]
        y = labels if rows is None else labels[rows]
        residual = torch.softmax(torch.einsum("bd,kcd->kbc", x, w), dim=-1)
        residual[:, torch.arange(len(y)), y] -= 1
        return torch.einsum("kbc,bd->kcd", residual, x) / len(y)

    def draw(generator: torch.Generator) -> Tensor | None:
        return torch.randint(0, n, (batch,), generator=generator) if noisy else None

    start = torch.zeros(classes, d, dtype=torch.float64)
    null = torch.kron(torch.ones(classes, classes, dtype=torch.float64) / classes,
                      torch.eye(d, dtype=torch.float64))
    _, f_star, grad_norm = _newton_minimum(lambda w: objective(w[None])[0], start, null)
    return Problem("rotated" if rotated else "softmax", "noisy" if noisy else "full", kappa,
                   start, objective, loss, gradient, draw, f_star, logits=logits,
                   info=dict(n=n, d=d, classes=classes, batch=batch if noisy else n,
                             f_star_grad_norm=grad_norm))


def make_problem(family: str, variant: str, kappa: float, args: argparse.Namespace) -> Problem:
    noisy = variant == "noisy"
    if family == "separable":
        return separable_problem(kappa, d=args.d, noisy=noisy, noise=args.noise, seed=args.seed)
    return softmax_problem(kappa, rotated=family == "rotated", noisy=noisy, n=args.n, d=args.d,
                           classes=args.classes, batch=args.batch, seed=args.seed)


# ----------------------------------------------------------------------------------------------
# Optimizers and their grids


def _lr_grid(low: float, high: float, per_decade: int) -> list[float]:
    """Log grid from ``high`` down to ``low`` (descending: divergent runs end fast, and a good
    configuration found early lets the slow small-lr runs stop early)."""
    count = round(math.log10(high / low) * per_decade)
    return [high * 10 ** (-i / per_decade) for i in range(count + 1)]


def configurations(name: str, quick: bool) -> list[dict]:
    """The hyperparameter grid of optimizer ``name``: a list of keyword dicts."""
    per_decade = 1 if quick else 2
    if name in ("GD", "GD+momentum"):
        return [dict(lr=lr) for lr in _lr_grid(1e-7, 1.0, per_decade)]
    if name in ("AdamW", "Lion"):
        return [dict(lr=lr) for lr in _lr_grid(1e-4, 1.0, per_decade)]
    # Sophia: lr is the clip radius (the largest step per coordinate), lr/ρ the Newton
    # damping of the unclipped coordinates; ρ is tuned as a multiple of lr.
    damping = (1.0, 0.3) if quick else (2.0, 1.0, 0.3, 0.1)
    return [dict(lr=lr, rho=lr / eta) for lr in _lr_grid(1e-4, 1.0, per_decade)
            for eta in damping]


class BatchedOptimizer:
    """One optimizer run for K configurations at once, on a stacked parameter (K, *shape).

    Each configuration's step is the optimizer's own rule with its own lr (and ρ): K
    independent runs, stacked so the Python overhead of a step is paid once, not K times (it
    dominates on problems this small). Sophia's step is the package's
    :func:`sophia_pytorch.functional.sophia_update` with lr and ρ as (K, 1, …) tensors, its
    refresh the package's EMA updates fed by :func:`sophia_pytorch.sampled_cross_entropy`
    (Sophia-G) or :func:`sophia_pytorch.hutchinson_estimate` (Sophia-H), with SophiaG's
    ``refresh_at_start`` and ``bias_correction`` schedule; the tests check each rule against
    the torch/sophia_pytorch optimizer class it stands for, configuration by configuration.
    """

    BETAS = dict(momentum=0.9, adamw=(0.9, 0.999), lion=(0.9, 0.99), sophia=(None, 0.99))

    def __init__(self, name: str, configs: list[dict], x: Tensor, *, refresh_every: int,
                 beta1: float = 0.965) -> None:
        self.name = name
        shape = (len(configs),) + (1,) * (x.dim() - 1)
        self.lr = torch.tensor([c["lr"] for c in configs], dtype=x.dtype).reshape(shape)
        if name.startswith("Sophia"):
            self.rho = torch.tensor([c["rho"] for c in configs], dtype=x.dtype).reshape(shape)
        self.refresh_every = refresh_every
        self.beta1 = beta1
        self.steps = 0
        self.refreshes = 0
        self.exp_avg = torch.zeros_like(x)
        self.second = torch.zeros_like(x)  # AdamW's v, Sophia's h

    def hessian_due(self) -> bool:
        return self.name.startswith("Sophia") and self.steps % self.refresh_every == 0

    def fold_hessian(self, estimate: Tensor, *, scale: float | None = None) -> None:
        """h ← bias-corrected EMA with ĥ = ``estimate`` (Sophia-H) or scale·g⊙g (Sophia-G)."""
        beta2 = self.BETAS["sophia"][1]
        self.refreshes += 1
        weight = (1 - beta2) / (1 - beta2 ** self.refreshes)
        if scale is None:
            functional.hessian_ema_update([self.second], [estimate], beta2=beta2,
                                          weights=[weight], foreach=False)
        else:
            functional.gauss_newton_ema_update([self.second], [estimate], beta2=beta2,
                                               scale=scale, weights=[weight], foreach=False)

    @torch.no_grad()
    def step(self, x: Tensor, grad: Tensor) -> None:
        self.steps += 1
        m = self.exp_avg
        if self.name == "GD":
            x.sub_(self.lr * grad)
        elif self.name == "GD+momentum":  # torch.optim.SGD's heavy ball: b ← μb + g
            m.copy_(grad if self.steps == 1 else m * self.BETAS["momentum"] + grad)
            x.sub_(self.lr * m)
        elif self.name == "AdamW":  # torch.optim.AdamW, eps 1e-8, weight decay 0
            beta1, beta2 = self.BETAS["adamw"]
            m.lerp_(grad, 1 - beta1)
            self.second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (self.second / (1 - beta2 ** self.steps)).sqrt_().add_(1e-8)
            x.sub_(self.lr / (1 - beta1 ** self.steps) * m / denom)
        elif self.name == "Lion":  # sophia_pytorch.harness.baselines.lion.Lion
            beta1, beta2 = self.BETAS["lion"]
            x.sub_(self.lr * m.lerp(grad, 1 - beta1).sign_())
            m.lerp_(grad, 1 - beta2)
        else:
            functional.sophia_update([x], [grad], [m], [self.second], lr=self.lr,
                                     beta1=self.beta1, rho=self.rho,
                                     weight_decay=0.0, eps=1e-15, foreach=False, fused=False)


def applies(name: str, problem: Problem) -> bool:
    """Sophia-G's Gauss-Newton-Bartlett estimate needs a softmax output."""
    return name != "Sophia-G" or problem.logits is not None


def refresh(optimizer: BatchedOptimizer, problem: Problem, x: Tensor, batch: object,
            generator: torch.Generator) -> None:
    """Sophia's Hessian refresh for every configuration at once, on the step's batch."""
    leaf = x.detach().requires_grad_(True)
    if optimizer.name == "Sophia-G":
        logits = problem.logits(leaf, batch)  # (K, B, C)
        sampled, count = sophia_pytorch.sampled_cross_entropy(logits, generator=generator)
        # The mean over K·B positions, times K: each configuration's own mean over its B.
        (grad,) = torch.autograd.grad(sampled * logits.shape[0], leaf)
        optimizer.fold_hessian(grad, scale=count / logits.shape[0])
    else:
        (estimate,) = sophia_pytorch.hutchinson_estimate(
            lambda: problem.loss(leaf, batch).sum(), [leaf], generator=generator)
        optimizer.fold_hessian(estimate)


def epsilons_of(variant: str, args: argparse.Namespace) -> list[float]:
    return args.epsilons if variant == "full" else args.noisy_epsilons


def tune(problem: Problem, name: str, args: argparse.Namespace) -> dict:
    """Run every configuration of ``name``'s grid side by side; for each ε, the fewest steps
    t with f(x_t) − f* ≤ ε and the configuration that took them (None: not within the cap).

    A diverged configuration (f non-finite or 10³ times its start gap) is dropped. The run
    ends when every ε has been reached by some configuration (no other can then do better),
    at the cap, or when every configuration has diverged.
    """
    configs = configurations(name, args.quick)
    count = len(configs)
    start = problem.start.expand(count, *problem.start.shape)
    x = start.clone()
    optimizer = BatchedOptimizer(name, configs, x, refresh_every=args.refresh_every,
                                 beta1=args.sophia_beta1)
    generator = torch.Generator().manual_seed(args.seed + 7)
    probe_generator = torch.Generator().manual_seed(args.seed + 8)
    alive = torch.ones(count, dtype=torch.bool)
    epsilons = epsilons_of(problem.variant, args)
    best: dict[float, tuple[int, dict] | None] = {e: None for e in epsilons}
    initial_gap = None
    for step in range(args.cap + 1):
        with torch.no_grad():
            gap = problem.objective(x) - problem.f_star  # (K,)
        if initial_gap is None:
            initial_gap = gap.clone()
        diverged = alive & ~(gap.isfinite() & (gap <= 1e3 * initial_gap.clamp(min=1.0)))
        if diverged.any():
            alive &= ~diverged
            view = (-1,) + (1,) * problem.start.dim()
            x = torch.where(alive.reshape(view), x, start)  # keep the dropped ones finite
            optimizer.exp_avg.mul_(alive.reshape(view))
            optimizer.second.mul_(alive.reshape(view))
        for eps in epsilons:
            hits = (alive & (gap <= eps)).nonzero()
            if best[eps] is None and len(hits):
                best[eps] = (step, configs[int(hits[0])])
        if all(b is not None for b in best.values()) or not alive.any() or step == args.cap:
            break
        batch = problem.draw(generator)
        if optimizer.hessian_due():
            refresh(optimizer, problem, x, batch, probe_generator)
        optimizer.step(x, problem.gradient(x, batch))
    return {str(e): dict(steps=None if b is None else b[0], config=None if b is None else b[1])
            for e, b in best.items()}


# ----------------------------------------------------------------------------------------------
# Report


def _cell(steps: int | None, cap: int) -> str:
    return f"> {cap}" if steps is None else str(steps)


def table(results: list[dict], args: argparse.Namespace) -> str:
    """Markdown: one row per (family, variant, ε, optimizer), one column per κ; "n/a": the
    optimizer does not apply (Sophia-G without a softmax), "—": κ not run."""
    kappas = sorted({r["kappa"] for r in results})
    head = "| family | variant | ε | optimizer | " + " | ".join(
        f"κ=1e{round(math.log10(k))}" for k in kappas) + " |"
    lines = [head, "|" + "---|" * 4 + "---:|" * len(kappas)]
    by_key = {(r["family"], r["variant"], r["kappa"], r["optimizer"]): r for r in results}
    for family in args.families:
        for variant in args.variants:
            for eps in epsilons_of(variant, args):
                for name in OPTIMIZERS:
                    cells = []
                    for kappa in kappas:
                        r = by_key.get((family, variant, kappa, name))
                        cells.append("—" if r is None else "n/a" if r["best"] is None
                                     else _cell(r["best"][str(eps)]["steps"],
                                                r.get("cap", args.cap)))
                    if all(c in ("n/a", "—") for c in cells):
                        continue
                    lines.append(f"| {family} | {variant} | {eps:g} | {name} | "
                                 + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f, v, e) for f in args.families for v in args.variants
              for e in epsilons_of(v, args)]
    columns = sum(len(epsilons_of(v, args)) for v in args.variants)
    rows = len(args.families)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False,
                             sharex=True, sharey=True)
    markers = dict(zip(OPTIMIZERS, "osD^vP"))
    colors = dict(zip(OPTIMIZERS, plt.get_cmap("tab10").colors))  # fixed even where one is n/a
    for ax, (family, variant, eps) in zip(axes.flat, panels):
        cap = max([r.get("cap", args.cap) for r in results
                   if (r["family"], r["variant"]) == (family, variant)], default=args.cap)
        for name in OPTIMIZERS:
            points = sorted((r["kappa"], r["best"][str(eps)]["steps"]) for r in results
                            if r["family"] == family and r["variant"] == variant
                            and r["optimizer"] == name and r["best"] is not None)
            if not points:
                continue
            kappas = [k for k, _ in points]
            steps = [cap * 1.25 if s is None else s for _, s in points]
            line, = ax.plot(kappas, steps, marker=markers[name], label=name, ms=4,
                            color=colors[name])
            capped = [(k, s) for k, s in zip(kappas, steps) if s > cap]
            if capped:
                ax.plot(*zip(*capped), ls="none", marker=markers[name], ms=7, mfc="white",
                        color=line.get_color())
        ax.axhline(cap, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{family}, {variant}, ε={eps:g}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("condition number κ")
    for ax in axes[:, 0]:
        ax.set_ylabel("steps to f* + ε")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(lab) > len(labels):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9,
               bbox_to_anchor=(0.5, 1.0))
    fig.text(0.5, -0.01, "best of each optimizer's lr (and ρ) grid per point; open markers "
             "above the dotted line: not reached within the cap (the dotted line)",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the outputs")
    parser.add_argument("--quick", action="store_true",
                        help="two κ, coarse grids, few steps: a smoke run for the tests")
    parser.add_argument("--kappas", type=float, nargs="+", default=None,
                        help="condition numbers (default 1e1 … 1e6; --quick: 1e1 1e4)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--epsilons", type=float, nargs="+", default=None,
                        help="gaps f − f* to reach, full batch (default 1e-4 1e-8; --quick: 1e-2)")
    parser.add_argument("--noisy-epsilons", type=float, nargs="+", default=None,
                        help="gaps to reach in the noisy variant, above its noise floor at a "
                        "constant lr (default 1e-2 1e-3; --quick: 1e-1)")
    parser.add_argument("--cap", type=int, default=None,
                        help="most steps per run (default 2000; --quick: 1000)")
    parser.add_argument("--d", type=int, default=16, help="coordinates / features")
    parser.add_argument("--n", type=int, default=256, help="softmax examples")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="minibatch of the noisy variant")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="gradient noise of the noisy separable problem, natural units")
    parser.add_argument("--refresh-every", type=int, default=10, help="Sophia's k")
    parser.add_argument("--sophia-beta1", type=float, default=0.965, help="Sophia's β1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: table and plot from these results.json files "
                        "(e.g. one per family, run as parallel processes)")
    args = parser.parse_args(argv)
    if args.kappas is None:
        args.kappas = [1e1, 1e4] if args.quick else [10.0 ** i for i in range(1, 7)]
    if args.epsilons is None:
        args.epsilons = [1e-2] if args.quick else [1e-4, 1e-8]
    if args.noisy_epsilons is None:
        args.noisy_epsilons = [1e-1] if args.quick else [1e-2, 1e-3]
    if args.cap is None:
        args.cap = 1000 if args.quick else 2000
    return args


def _options(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k != "merge"}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    if args.merge:
        runs = [json.loads(path.read_text()) for path in args.merge]
        results = [{"cap": run["args"]["cap"], **r} for run in runs for r in run["results"]]
        args.families = [f for f in FAMILIES if any(r["family"] == f for r in results)]
        args.kappas = sorted({r["kappa"] for r in results})
        args.variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
        for key in ("epsilons", "noisy_epsilons", "cap"):
            setattr(args, key, runs[0]["args"][key])
        print("merged runs of " + ", ".join(f"{run['seconds']:.0f} s" for run in runs))
    for family in args.families if not args.merge else ():
        for variant in args.variants:
            for kappa in args.kappas:
                problem = make_problem(family, variant, kappa, args)
                for name in args.optimizers:
                    t0 = time.perf_counter()
                    best = tune(problem, name, args) if applies(name, problem) else None
                    results.append(dict(family=family, variant=variant, kappa=kappa,
                                        optimizer=name, best=best, f_star=problem.f_star,
                                        cap=args.cap,
                                        info=problem.info,
                                        seconds=round(time.perf_counter() - t0, 2)))
                    if best is not None:
                        summary = ", ".join(f"ε={e}: {_cell(b['steps'], args.cap)}"
                                            for e, b in best.items())
                        print(f"[{time.perf_counter() - started:7.1f}s] {family}/{variant} "
                              f"κ={kappa:.0e} {name}: {summary}", flush=True)
                    partial = dict(args=_options(args), seconds=None, results=results)
                    (args.out / "results.json").write_text(json.dumps(partial, indent=1))
    elapsed = time.perf_counter() - started
    text = table(results, args)
    (args.out / "table.md").write_text(text + "\n")
    if not args.merge:
        (args.out / "results.json").write_text(json.dumps(
            dict(args=_options(args), seconds=round(elapsed, 1), results=results), indent=1))
    plot(results, args, args.out / "curvature_map.png")
    print(text)
    print(f"\n{elapsed:.0f} s wall, one thread; outputs in {args.out}")
    return results


if __name__ == "__main__":
    main()
