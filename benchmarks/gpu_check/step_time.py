"""Section 3: SophiaG step time (float32 and bf16 state) against fused and foreach AdamW, with
achieved bandwidth."""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

from sophia_pytorch import SophiaG

from .common import (
    BATCH_SAMPLES,
    BYTES_PER_COORDINATE,
    NOMINAL_BANDWIDTH_TBPS,
    Context,
    _error_text,
    gpt_shapes,
    time_ms,
)
from .report import Section


def copy_bandwidth(ctx: Context) -> float:
    """Bytes/s of ``dst.copy_(src)`` on the device (one read and one write per byte copied),
    the median of 10 copies of ``scale.copy_numel`` float32s."""
    src = torch.randn(ctx.scale.copy_numel, device=ctx.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [time_ms(ctx, lambda: dst.copy_(src)) for _ in range(10)]
    return 2 * src.numel() * src.element_size() / (statistics.median(times) / 1e3)


def nominal_bandwidth(name: str) -> float | None:
    """The vendor's figure (TB/s) for a known device name; torch cannot query it."""
    for key, value in NOMINAL_BANDWIDTH_TBPS.items():
        if all(part in name for part in key.split()):
            return value
    return None


def section_step_time(ctx: Context, section: Section) -> None:
    bandwidth = copy_bandwidth(ctx)
    section.figures["copy bandwidth (GB/s, measured: 2 x bytes / time)"] = bandwidth / 1e9
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else platform.processor()
    if ctx.cuda and nominal_bandwidth(name):
        section.figures["nominal bandwidth (TB/s, vendor figure by name)"] = \
            nominal_bandwidth(name)
    section.notes.append("Bytes counted: the least each update must move per float32 "
                         "coordinate, SophiaG 24 B (reads p, g, m, h; writes p, m), AdamW 28 B "
                         "(reads p, g, m, v; writes p, m, v); temporaries are not counted, so "
                         "a path that materialises them shows a lower achieved rate.")
    section.notes.append(f"Timing: {'CUDA events' if ctx.cuda else 'perf_counter'} around "
                         f"each round's {ctx.scale.steps_per_round} steps, the per-step median "
                         f"over {ctx.scale.rounds} rounds; optimizers interleaved, the order "
                         "rotating each round.")
    for index, (set_name, shape) in enumerate(ctx.scale.step_sets.items()):
        if ctx.left() < 30:
            section.skip(f"GPT {set_name}", f"budget ({ctx.left():.0f} s left)")
            continue
        try:
            _time_set(ctx, section, set_name, shape, bandwidth, first=index == 0)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the next set may fit
            section.check(f"GPT {set_name}: every optimizer stepped", False, _error_text(exc))
        finally:
            if ctx.cuda:
                torch.cuda.empty_cache()


def _time_set(ctx: Context, section: Section, set_name: str, shape: dict[str, int],
              bandwidth: float, *, first: bool) -> None:
    generator = torch.Generator(ctx.device).manual_seed(0)
    params = []
    for s in gpt_shapes(**shape):
        param = (torch.randn(s, device=ctx.device, generator=generator) * 0.02).requires_grad_()
        param.grad = torch.randn(s, device=ctx.device, generator=generator) * 1e-2
        params.append(param)
    numel = sum(p.numel() for p in params)
    rows: dict[str, tuple[int, Callable[[], object]]] = {}
    sophia = SophiaG(params, lr=1e-4, rho=0.04, foreach=True, fused=False)
    sophia.update_hessian(scale=BATCH_SAMPLES)
    rows["SophiaG foreach"] = (BYTES_PER_COORDINATE["SophiaG"], sophia.step)
    # bf16 state (m, h 2 bytes each): no fused GPU kernel, so its foreach path also builds
    # the stochastic-rounding bits in torch ops; this row says what that costs
    sophia_bf16 = SophiaG(params, lr=1e-4, rho=0.04, foreach=True, fused=False,
                          state_dtype=torch.bfloat16)
    sophia_bf16.update_hessian(scale=BATCH_SAMPLES)
    rows["SophiaG foreach, bf16 state"] = (BYTES_PER_COORDINATE["SophiaG bf16 state"],
                                           sophia_bf16.step)
    # A compile takes ~1-2 min; the later sections (refresh cost, DDP, the ~4 min comparison)
    # keep ~300 s. The first set compiles when 200 s are left, the others only with room.
    if ctx.left() > (200 if first else 380):
        compiled_opt = SophiaG(params, lr=1e-4, rho=0.04, fused=False)
        compiled_opt.update_hessian(scale=BATCH_SAMPLES)
        torch.compiler.reset()

        @torch.compile(backend=ctx.compile_backend)
        def compiled_step() -> None:
            compiled_opt.step()

        rows[f"SophiaG torch.compile ({ctx.compile_backend})"] = \
            (BYTES_PER_COORDINATE["SophiaG"], compiled_step)
    else:
        section.skip(f"GPT {set_name}: compiled SophiaG", f"budget ({ctx.left():.0f} s left; a "
                     "compile takes ~1-2 min, the later sections keep ~300 s)")
    fused = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    foreach = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)
    rows["AdamW fused"] = (BYTES_PER_COORDINATE["AdamW"], fused.step)
    rows["AdamW foreach"] = (BYTES_PER_COORDINATE["AdamW"], foreach.step)
    for row, (_, step) in rows.items():  # warm-up: state, first touch, compilation
        began = time.monotonic()
        step()
        step()
        ctx.sync()
        section.figures[f"GPT {set_name} {row}: warm-up s"] = round(time.monotonic() - began, 2)
    times: dict[str, list[float]] = {row: [] for row in rows}
    names = list(rows)
    for index in range(ctx.scale.rounds):
        shift = index % len(names)
        for row in names[shift:] + names[:shift]:
            times[row].append(time_ms(ctx, rows[row][1], ctx.scale.steps_per_round))
    reference = statistics.median(times["AdamW fused"])
    table = []
    for row, (per_coordinate, _) in rows.items():
        median = statistics.median(times[row])
        achieved = per_coordinate * numel / (median / 1e3)
        table.append([row, median, min(times[row]), median / reference, achieved / 1e9,
                      achieved / bandwidth])
    section.table(f"GPT {set_name}: {len(params)} tensors, {numel / 1e6:.1f}M float32 "
                  "parameters",
                  ["optimizer", "median ms/step", "min ms/step", "x fused AdamW",
                   "achieved GB/s", "x copy bandwidth"], table)
    finite = all(p.isfinite().all() for p in params)
    section.check(f"GPT {set_name}: every optimizer stepped, parameters finite",
                  bool(finite) and all(math.isfinite(r[1]) and r[1] > 0 for r in table))
