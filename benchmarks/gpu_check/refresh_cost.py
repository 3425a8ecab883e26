"""Section 4: time and peak memory of a step, and of a step plus a Sophia-G refresh."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from .common import CUDA_ONLY, Context, time_ms
from .report import Section


def section_refresh_cost(ctx: Context, section: Section) -> None:
    from sophia_pytorch.harness.config import make_config
    from sophia_pytorch.harness.model import GPT, GPTConfig, lm_loss
    from sophia_pytorch.harness.optimizers import build_optimizer, build_refresh

    config = make_config("gpt2-small", {**ctx.scale.refresh_model, "device": ctx.device.type,
                                        "progress": False})
    shape, run = config.model, config.run
    vocab = config.data.bpe_vocab_size
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=shape.block_size, n_layer=shape.n_layer,
                          n_head=shape.n_head, n_embd=shape.n_embd)).to(ctx.device)
    optimizer = build_optimizer(config, model, ctx.device)

    def autocast() -> Any:
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16)

    refresh = build_refresh(config, optimizer, model, autocast=autocast, device=ctx.device)
    generator = torch.Generator(ctx.device).manual_seed(0)
    x = torch.randint(0, vocab, (run.batch_size, shape.block_size), device=ctx.device,
                      generator=generator)
    y = torch.randint(0, vocab, (run.batch_size, shape.block_size), device=ctx.device,
                      generator=generator)
    clip = config.optimizer.grad_clip

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_and_refresh() -> None:
        train_step()
        refresh.estimate([(x, y)], generator)

    section.figures.update({
        "model": f"{shape.n_layer} layers x {shape.n_embd}, {shape.n_head} heads, context "
                 f"{shape.block_size}, vocab {vocab}, {model.num_parameters() / 1e6:.1f}M params",
        "batch": f"one micro-batch of the preset, {run.batch_size} x {shape.block_size} tokens "
                 "(the preset accumulates 60; the refresh share is the same ratio)",
        "refresh rows": f"{refresh.rows} of {run.batch_size} (refresh_fraction "
                        f"{config.optimizer.refresh_fraction})",
        "optimizer": f"SophiaG from the preset's row: lr {config.optimizer.lr}, rho "
                     f"{config.optimizer.rho}; autocast bfloat16, float32 parameters",
    })
    measured: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    for name, fn in (("step", train_step), ("step + refresh", step_and_refresh)):
        fn()
        fn()  # warm-up: state, allocator, kernels
        ctx.sync()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        measured[name] = statistics.median(time_ms(ctx, fn)
                                           for _ in range(ctx.scale.refresh_repeats))
        peaks[name] = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None
    refresh_ms = measured["step + refresh"] - measured["step"]
    k = config.optimizer.refresh_every
    share = refresh_ms / (k * measured["step"] + refresh_ms)
    section.figures["training step (ms, median)"] = measured["step"]
    section.figures["step + refresh (ms, median)"] = measured["step + refresh"]
    section.figures["refresh alone (ms, the difference)"] = refresh_ms
    section.figures[f"refresh share of training time at k = {k}"] = share
    if ctx.cuda:
        section.figures["peak memory, step (GiB)"] = peaks["step"]
        section.figures["peak memory, step + refresh (GiB)"] = peaks["step + refresh"]
    else:
        section.skip("peak memory", CUDA_ONLY)
    finite = all(p.isfinite().all() for p in model.parameters())
    section.check("step and refresh ran, parameters finite", bool(finite),
                  f"refresh share at k = {k}: {share:.1%}")
