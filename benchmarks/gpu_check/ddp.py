"""Section 6: DDP over NCCL: a two-ranks-on-one-GPU probe and ``sophia train --parallel ddp``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import CUDA_ONLY, PACKAGE, Context, _python_env, corpus_file, run_child
from .report import Section


def section_ddp(ctx: Context, section: Section) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    env = {**_python_env(), "OMP_NUM_THREADS": "1"}
    name = "two NCCL ranks on one GPU (probe)"
    if not ctx.cuda:
        section.skip(name, CUDA_ONLY)
    elif ctx.left() < 60:
        section.skip(name, f"budget ({ctx.left():.0f} s left)")
    else:
        command = [*torchrun, "--nproc-per-node", "2", str(PACKAGE),
                   "--nccl-probe"]
        try:
            done = run_child(command, timeout=90, env=env)
            allowed = done.returncode == 0 and done.stdout.count("nccl-probe ok") == 2
            tail = " / ".join((done.stderr or "").strip().splitlines()[-2:])
            section.figures[name] = "allowed" if allowed else f"refused: {tail[:300]}"
        except subprocess.TimeoutExpired:
            section.figures[name] = "timed out after 90 s (treated as refused)"
        section.notes.append("NCCL refuses two ranks on one device in most versions; the "
                             "harness also gives rank r GPU r. So the harness runs at world "
                             "size 1 below, a real NCCL process group of one.")
    data = corpus_file(ctx, 200_000)
    optimizers = ("sophiag", "sophiah") if ctx.cuda else ("sophiag",)
    for optimizer in optimizers:
        label = (f"torchrun --nproc-per-node 1 sophia train --parallel ddp --optimizer "
                 f"{optimizer} ({'NCCL' if ctx.cuda else 'gloo on CPU'})")
        if ctx.left() < 40:
            section.skip(label, f"budget ({ctx.left():.0f} s left)")
            continue
        run_dir = ctx.work / f"ddp-{optimizer}"
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in ctx.scale.ddp_model.items()]
        command = [*torchrun, "--nproc-per-node", "1", "-m", "sophia_pytorch.harness", "train",
                   "--parallel", "ddp", "--device", ctx.device.type, "--optimizer", optimizer,
                   *flags, "--no-progress", "--overwrite", "--data", str(data),
                   "--cache-dir", str(ctx.work / "cache"), "--out-dir", str(run_dir)]
        began = time.monotonic()
        try:
            done = run_child(command, timeout=max(30.0, min(180.0, ctx.left() - 5)),
                             env={**env, "NCCL_DEBUG": "INFO"})
        except subprocess.TimeoutExpired:
            section.check(label, False, "timed out")
            continue
        steps = ctx.scale.ddp_model["max_steps"]
        records = _log_rows(run_dir)
        refreshes = sum(1 for r in records if r.get("kind") == "step" and r.get("hessian"))
        ok = done.returncode == 0 and f"done: {steps} steps" in done.stdout
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        detail = (f"{len([r for r in records if r.get('kind') == 'step'])} steps, {refreshes} "
                  f"Hessian refreshes, {time.monotonic() - began:.1f} s"
                  + ("" if ok else f"; exit {done.returncode}: {tail[:400]}"))
        section.check(label, ok and refreshes > 0, detail)
        if ctx.cuda:
            section.figures[f"{optimizer}: NCCL INFO lines"] = \
                (done.stdout + done.stderr).count("NCCL INFO")


def _log_rows(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
                if line.strip()]
    except (OSError, ValueError):
        return []


def nccl_probe() -> None:
    """One rank of the two-ranks-on-one-GPU probe (under torchrun)."""
    import torch.distributed as dist

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    value = torch.ones(1, device=device)
    dist.all_reduce(value)
    torch.cuda.synchronize()
    if float(value) == dist.get_world_size():
        print("nccl-probe ok", flush=True)
    dist.destroy_process_group()
