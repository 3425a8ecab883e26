"""Section 1: SophiaG and SophiaH on the device against a float64 CPU re-derivation."""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from sophia_pytorch import SophiaG, SophiaH, rademacher_like

from .common import BATCH_SAMPLES, EVENTS, HP, TOLERANCES, Context, _error_text, gpt_shapes
from .report import Section


def _reference_run(params: list[torch.Tensor], grads_per_event: list[list[torch.Tensor]],
                   param_dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    """The Sophia rule of the docstrings, re-derived in float64 on the CPU::

        step:     p ← p(1 − lr·wd);  m ← β1 m + (1 − β1) g;  p ← p − lr·clamp(m / max(ρh, ε), ±1)
        refresh:  h ← β2 h + (1 − β2)·B·g⊙g

    A parameter holds its own dtype: it is rounded to it after the weight decay and after the
    update, and the update lr·clamp(…) is rounded to it before it is added (the state is float32
    for bf16 parameters, the update is computed there and rounded once into the parameter).
    """
    lr, (beta1, beta2), rho = HP["lr"], HP["betas"], HP["rho"]
    p = [t.double().clone() for t in params]
    m = [torch.zeros_like(t) for t in p]
    h = [torch.zeros_like(t) for t in p]
    for kind, grads in zip(EVENTS, grads_per_event):
        g = [t.double() for t in grads]
        for i in range(len(p)):
            if kind == "refresh":
                h[i] = beta2 * h[i] + (1 - beta2) * BATCH_SAMPLES * g[i] * g[i]
                continue
            p[i] = _rounded(p[i] * (1 - lr * HP["weight_decay"]), param_dtype)
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            ratio = (m[i] / torch.clamp(rho * h[i], min=HP["eps"])).clamp(-1.0, 1.0)
            p[i] = _rounded(p[i] - _rounded(lr * ratio, param_dtype), param_dtype)
    return {"params": p, "exp_avg": m, "hessian": h}


def _rounded(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype).double()


def _close(actual: list[torch.Tensor], expected: list[torch.Tensor], *, atol: float,
           rtol: float) -> tuple[bool, float, float]:
    """(every |a − e| <= atol + rtol·|e|, the largest |a − e|, the largest error / tolerance)."""
    worst_abs, worst_ratio = 0.0, 0.0
    for a, e in zip(actual, expected):
        diff = (a.detach().double().cpu() - e).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        worst_ratio = max(worst_ratio, float((diff / (atol + rtol * e.abs())).max()))
    return worst_ratio <= 1.0, worst_abs, worst_ratio


def _compare_state(section: Section, name: str, tolerance: str,
                   found: dict[str, list[torch.Tensor]],
                   expected: dict[str, list[torch.Tensor]]) -> None:
    details, ok = [], True
    for key in ("params", "exp_avg", "hessian"):
        if key not in found:
            continue
        if key == "params":
            atol, rtol = TOLERANCES[tolerance]["atol"], TOLERANCES[tolerance]["rtol"]
        else:
            largest = max(float(t.abs().max()) for t in expected[key])
            atol = max(TOLERANCES["state"]["atol_of_max"] * largest, 1e-30)
            rtol = TOLERANCES["state"]["rtol"]
        passed, worst, ratio = _close(found[key], expected[key], atol=atol, rtol=rtol)
        ok &= passed
        details.append(f"{key} max err {worst:.2e} ({ratio:.2g} of tol)")
    section.check(name, ok, "; ".join(details))


def _run_sophiag(ctx: Context, start: list[torch.Tensor], grads_per_event: list[list[torch.Tensor]],
                 dtype: torch.dtype, *, foreach: bool, compiled: bool) -> dict[str, list]:
    # copy=True: on the CPU (dry run) .to() would otherwise hand back ``start`` itself.
    params = [t.to(device=ctx.device, dtype=dtype, copy=True).requires_grad_() for t in start]
    optimizer = SophiaG(params, **HP, foreach=foreach, fused=False)
    step = optimizer.step
    if compiled:
        torch.compiler.reset()

        @torch.compile(backend=ctx.compile_backend)
        def step() -> None:
            optimizer.step()

    for kind, grads in zip(EVENTS, grads_per_event):
        for param, grad in zip(params, grads):
            param.grad = grad.to(device=ctx.device, dtype=dtype, copy=True)
        if kind == "step":
            step()
        elif not optimizer.update_hessian(scale=BATCH_SAMPLES):
            raise RuntimeError("update_hessian skipped the refresh")
    ctx.sync()
    return {"params": params, "exp_avg": [optimizer.state[p]["exp_avg"] for p in params],
            "hessian": [optimizer.state[p]["hessian"] for p in params]}


def section_correctness(ctx: Context, section: Section) -> None:
    section.figures["tolerances"] = TOLERANCES
    section.figures["hyperparameters"] = {**HP, "B": BATCH_SAMPLES, "events": list(EVENTS)}
    shapes = gpt_shapes(**ctx.scale.correctness_gpt)
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=generator, dtype=torch.float64) * 0.02 for s in shapes]
    grads64 = [[torch.randn(s, generator=generator, dtype=torch.float64) * 1e-2 for s in shapes]
               for _ in EVENTS]
    section.figures["tensors"] = len(shapes)
    section.figures["parameters"] = sum(math.prod(s) for s in shapes)
    section.figures["compile_backend"] = ctx.compile_backend
    precision = _ieee_fp32()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            start_d = [t.to(dtype) for t in start]
            grads_d = [[g.to(dtype) for g in grads] for grads in grads64]
            expected = _reference_run(start_d, grads_d, dtype)
            if dtype == torch.float32:
                unclipped = sum(int((m.abs() < HP["rho"] * h).sum()) for m, h in
                                zip(expected["exp_avg"], expected["hessian"]))
                section.figures["reference unclipped fraction"] = \
                    unclipped / section.figures["parameters"]
            for label, foreach, compiled in (("foreach", True, False),
                                             ("for-loop", False, False),
                                             ("torch.compile(step)", False, True)):
                name = f"SophiaG {label}, {str(dtype).removeprefix('torch.')} params"
                tolerance = f"{str(dtype).removeprefix('torch.')} params"
                if compiled and f"{tolerance}, compiled" in TOLERANCES:
                    tolerance += ", compiled"
                if ctx.left() < 10:
                    section.skip(name, f"budget ({ctx.left():.0f} s left)")
                    continue
                began = time.monotonic()
                try:
                    found = _run_sophiag(ctx, start_d, grads_d, dtype, foreach=foreach,
                                         compiled=compiled)
                    _compare_state(section, name, tolerance, found, expected)
                except Exception as exc:  # noqa: BLE001 - one path failing is a finding
                    section.check(name, False, _error_text(exc))
                section.figures[f"{name} seconds"] = round(time.monotonic() - began, 2)
        for foreach in (True, False):
            name = f"SophiaH {'foreach' if foreach else 'for-loop'}: Hutchinson refresh + step"
            try:
                _check_sophiah(ctx, section, name, foreach=foreach)
            except Exception as exc:  # noqa: BLE001
                section.check(name, False, _error_text(exc))
    finally:
        _restore_fp32(precision)


def _ieee_fp32() -> str | None:
    """Turn TF32 off for float32 matmuls (the float64 comparison assumes IEEE float32)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        return None
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    return before


def _restore_fp32(before: str | None) -> None:
    if before is not None:
        torch.backends.cuda.matmul.fp32_precision = before


def _check_sophiah(ctx: Context, section: Section, name: str, *, foreach: bool) -> None:
    """Sophia-H's refresh on the harness GPT (float32, math attention on the device) against
    u⊙(Hu) computed in float64 on the CPU with the same probes; then one step with the
    device's h, against the float64 rule."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sophia_pytorch.harness.model import GPT, GPTConfig

    config = GPTConfig(**ctx.scale.hutchinson_gpt)
    torch.manual_seed(1)
    model = GPT(config)
    reference = copy.deepcopy(model).double()
    model = model.to(ctx.device)
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(0, config.vocab_size, (4, config.block_size), generator=generator)
    y = torch.randint(0, config.vocab_size, (4, config.block_size), generator=generator)

    def loss_of(net: torch.nn.Module, device: torch.device) -> torch.Tensor:
        logits = net(x.to(device))
        return F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())

    params = list(model.parameters())
    optimizer = SophiaH(params, **HP, foreach=foreach, fused=False)
    refreshed = optimizer.update_hessian(lambda: loss_of(model, ctx.device),
                                         generator=torch.Generator().manual_seed(3))
    ctx.sync()
    # u⊙(Hu) in float64: the probes are the same draws (one per parameter, in order).
    ref_params = list(reference.parameters())
    probe_source = torch.Generator().manual_seed(3)
    with sdpa_kernel([SDPBackend.MATH]):  # the one attention with a double backward
        loss = loss_of(reference, torch.device("cpu"))
        grads = torch.autograd.grad(loss, ref_params, create_graph=True)
        probes = [rademacher_like(p, probe_source) for p in ref_params]
        hvps = torch.autograd.grad(grads, ref_params, grad_outputs=probes)
    beta2 = HP["betas"][1]
    expected_h = [(1 - beta2) * u * hv for u, hv in zip(probes, hvps)]
    found_h = [optimizer.state[p]["hessian"].detach().double().cpu() for p in params]
    error = torch.cat([(f - e).flatten() for f, e in zip(found_h, expected_h)]).norm()
    size = torch.cat([e.flatten() for e in expected_h]).norm()
    relative = float(error / size)
    estimate_ok = refreshed and relative <= TOLERANCES["hutchinson"]["normwise"]
    # Then a step with fresh gradients, against the rule with h = the device's h.
    step_grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) * 1e-2
                  for p in params]
    start = [p.detach().double().cpu() for p in params]
    for param, grad in zip(params, step_grads):
        param.grad = grad.to(device=ctx.device, dtype=param.dtype)
    optimizer.step()
    ctx.sync()
    lr, beta1 = HP["lr"], HP["betas"][0]
    expected_p = []
    for p0, g, h in zip(start, step_grads, found_h):
        g = g.float().double()
        ratio = ((1 - beta1) * g / torch.clamp(HP["rho"] * h, min=HP["eps"])).clamp(-1, 1)
        expected_p.append((p0 * (1 - lr * HP["weight_decay"]) - lr * ratio).float().double())
    step_ok, worst, ratio = _close(params, expected_p, **TOLERANCES["float32 params"])
    negative = sum(int((h < 0).sum()) for h in found_h)
    section.check(name, estimate_ok and step_ok,
                  f"estimate normwise rel err {relative:.2e} (tol "
                  f"{TOLERANCES['hutchinson']['normwise']:g}); step max err {worst:.2e} "
                  f"({ratio:.2g} of tol); {negative} coordinates with h < 0")
