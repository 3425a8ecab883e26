"""Section 2: no host sync under ``set_sync_debug_mode("error")``; CUDA graph capture and replay."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch

from sophia_pytorch import SophiaG, sampled_cross_entropy

from .common import (
    BATCH_SAMPLES,
    CUDA_ONLY,
    GPU,
    HP,
    PACKAGE,
    Context,
    _error_text,
    gpt_shapes,
    run_child,
)
from .report import Section


def _sync_free_round(ctx: Context, optimizer: SophiaG, params: list[torch.Tensor],
                     grads: list[torch.Tensor], features: torch.Tensor,
                     generator: torch.Generator) -> bool:
    """A step, then a Sophia-G refresh through a GPT-shaped output layer (params[0] is the
    tied embedding, (vocab, width)): Gumbel-max labels, count as a tensor, tensor scale."""
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    logits = features @ params[0].t()
    loss, count = sampled_cross_entropy(logits, generator=generator, count_as_tensor=True)
    loss.backward()
    refreshed = optimizer.update_hessian(scale=count)
    optimizer.zero_grad(set_to_none=True)
    return refreshed


def section_no_sync(ctx: Context, section: Section) -> None:
    shapes = gpt_shapes(**ctx.scale.correctness_gpt)
    width = ctx.scale.correctness_gpt["width"]
    torch.manual_seed(0)
    params = [(torch.randn(s, device=ctx.device) * 0.02).requires_grad_() for s in shapes]
    grads = [torch.randn(s, device=ctx.device) * 1e-2 for s in shapes]
    features = torch.randn(8, 64, width, device=ctx.device)
    generator = torch.Generator(ctx.device).manual_seed(0)
    optimizer = SophiaG(params, **HP, foreach=True, fused=False)
    # Warm-up outside the debug mode: lazy state, cuBLAS handles, the allocator's first blocks.
    _sync_free_round(ctx, optimizer, params, grads, features, generator)
    ctx.sync()
    name = 'step + Sophia-G refresh under set_sync_debug_mode("error")'
    if not ctx.cuda:
        refreshed = _sync_free_round(ctx, optimizer, params, grads, features, generator)
        section.check("step + refresh with count_as_tensor and a tensor scale run (CPU)",
                      refreshed, "the code path only; host syncs are a CUDA notion")
        section.skip(name, CUDA_ONLY)
    else:
        torch.cuda.set_sync_debug_mode("error")
        try:
            refreshed = _sync_free_round(ctx, optimizer, params, grads, features, generator)
            error = None
        except RuntimeError as exc:
            refreshed, error = False, _error_text(exc)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ctx.sync()
        section.check(name, error is None and refreshed,
                      error or "no synchronizing call; update_hessian returned True")
        section.figures["whole-model refresh under sync debug (informational)"] = \
            _whole_model_sync(ctx)
    graph = "CUDA graph capture + replay of step and refresh (child process)"
    if not ctx.cuda:
        section.skip(graph, CUDA_ONLY)
        return
    if ctx.left() < 30:
        section.skip(graph, f"budget ({ctx.left():.0f} s left)")
        return
    command = [sys.executable, str(PACKAGE), "--graph-probe"]
    try:
        done = run_child(command, timeout=max(10.0, min(120.0, ctx.left() - 5)))
    except subprocess.TimeoutExpired:
        section.check(graph, False, "the child process timed out")
        return
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        section.check(graph, False, f"exit {done.returncode}: {' / '.join(tail)}")
        return
    result = json.loads(lines[-1])
    for key, value in result.items():
        if key.endswith("_ok"):
            section.check(f"graph {key.removesuffix('_ok').replace('_', ' ')}", value,
                          result.get(key.removesuffix("_ok") + "_detail", ""))
    section.notes.append("Captured steps do not advance the optimizer's CPU step counters "
                         "(they are host tensors, touched at capture only); the update rule "
                         "does not read them.")


def _whole_model_sync(ctx: Context) -> str:
    """The same refresh through the harness GPT (forward and backward included): which op,
    if any, synchronises. Informational: the model's own ops are not the library's claim."""
    from sophia_pytorch.harness.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64))
    model = model.to(ctx.device)
    optimizer = SophiaG(model.parameters(), **HP, foreach=True, fused=False)
    x = torch.randint(0, 256, (4, 64), device=ctx.device)
    generator = torch.Generator(ctx.device).manual_seed(0)

    def refresh() -> None:
        loss, count = sampled_cross_entropy(model(x), generator=generator, count_as_tensor=True)
        loss.backward()
        optimizer.update_hessian(scale=count)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    refresh()
    ctx.sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        refresh()
        verdict = "no synchronizing call"
    except RuntimeError as exc:
        verdict = f"synchronises: {_error_text(exc)}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ctx.sync()
    return verdict


def graph_probe() -> dict[str, Any]:
    """Capture a SophiaG step, and a refresh with a tensor scale, in CUDA graphs; replay them
    with new gradients and compare bitwise with an eager twin fed the same gradients."""
    device = torch.device("cuda")
    shapes = gpt_shapes(**GPU.correctness_gpt)
    torch.manual_seed(0)
    start = [torch.randn(s, device=device) * 0.02 for s in shapes]
    feeds = [[torch.randn(s, device=device) * 1e-2 for s in shapes] for _ in range(5)]
    captured = [t.clone().requires_grad_() for t in start]
    eager = [t.clone().requires_grad_() for t in start]
    static_grads = [torch.zeros_like(t) for t in start]
    for param, grad in zip(captured, static_grads):
        param.grad = grad
    opt_c = SophiaG(captured, **HP, foreach=True, fused=False)
    opt_e = SophiaG(eager, **HP, foreach=True, fused=False)
    scale, eager_scale = torch.tensor(BATCH_SAMPLES, device=device), torch.tensor(BATCH_SAMPLES,
                                                                                  device=device)

    def feed(index: int) -> None:
        for grad, value in zip(static_grads, feeds[index]):
            grad.copy_(value)
        for param, value in zip(eager, feeds[index]):
            param.grad = value.clone()

    result: dict[str, Any] = {}
    feed(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as the CUDA graphs notes advise
        for _ in range(3):
            opt_c.step()
            opt_c.update_hessian(scale=scale)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        opt_e.step()
        opt_e.update_hessian(scale=eager_scale)
    step_graph, refresh_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(step_graph):
        opt_c.step()
    with torch.cuda.graph(refresh_graph):
        opt_c.update_hessian(scale=scale)
    for index in range(1, 5):
        feed(index)
        step_graph.replay()
        opt_e.step()
        value = BATCH_SAMPLES * (1 + index)
        scale.fill_(value)
        eager_scale.fill_(value)
        refresh_graph.replay()
        opt_e.update_hessian(scale=eager_scale)
    torch.cuda.synchronize()

    def same(key: str | None) -> tuple[bool, str]:
        pairs = [(c, e) if key is None else (opt_c.state[c][key], opt_e.state[e][key])
                 for c, e in zip(captured, eager)]
        equal = all(torch.equal(a, b) for a, b in pairs)
        worst = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
        return equal, f"bitwise equal: {equal}, max diff {worst:.2e} after 4 replays"

    result["step_replay_params_ok"], result["step_replay_params_detail"] = same(None)
    result["step_replay_exp_avg_ok"], result["step_replay_exp_avg_detail"] = same("exp_avg")
    result["refresh_replay_hessian_ok"], result["refresh_replay_hessian_detail"] = \
        same("hessian")
    return result
