"""The driver: which sections run, in what order, within the budget; the command line."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import DRY, GPU, ROOT, WATCHDOG_GRACE_S, Context, _error_text, say
from .compare import section_compare
from .correctness import section_correctness
from .ddp import nccl_probe, section_ddp
from .no_sync import graph_probe, section_no_sync
from .refresh_cost import section_refresh_cost
from .report import Report, Section
from .step_time import section_step_time

# number -> (key, title, function, seconds it needs at least to start)
SECTIONS: dict[int, tuple[str, str, Callable[[Context, Section], None], float]] = {
    1: ("correctness", "Correctness on the device against float64", section_correctness, 30),
    2: ("no_sync", "No host sync; CUDA graphs", section_no_sync, 15),
    3: ("step_time", "Step time against AdamW", section_step_time, 40),
    4: ("refresh_cost", "Refresh cost and memory, gpt2-small bf16", section_refresh_cost, 20),
    5: ("compare", "A short comparison: Sophia-G against AdamW", section_compare, 60),
    6: ("ddp", "DDP over NCCL", section_ddp, 30),
}
# The comparison runs last: it takes whatever time is left.
ORDER = (1, 2, 3, 4, 6, 5)


def _header(args: argparse.Namespace, argv: list[str], device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    detail = "CPU"
    if cuda:
        props = torch.cuda.get_device_properties(device)
        detail = (f"{props.name}, compute capability {props.major}.{props.minor}, "
                  f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs")
    driver = "n/a"
    if cuda:
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            driver = "unknown (no nvidia-smi)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    nccl = "n/a"
    if cuda:
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception:  # noqa: BLE001 - a build without NCCL
            nccl = "unavailable"
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else "CPU (dry run)",
        "device_detail": detail, "dry_run": args.dry_run, "budget_s": args.budget_s,
        "command": " ".join(["python", "-m", "benchmarks.gpu_check", *argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "nccl": nccl,
        "driver": driver, "python": platform.python_version(),
        "host": f"{platform.platform()}, {os.cpu_count()} CPUs", "commit": commit,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="GPU evidence in one command: six checks of the library and harness on one "
                    "NVIDIA GPU (docs/BENCHMARKS.md, \"The GPU check\").")
    parser.add_argument("--out", type=Path, help="report folder (gpu_check.json, gpu_check.md)")
    parser.add_argument("--work", type=Path,
                        help="folder for runs, checkpoints and token caches (a new temporary "
                             "folder); kept out of --out, which gets only the reports")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds the whole check may take; sections that no longer fit "
                             "are skipped (480)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every section on the CPU with tiny shapes; CUDA-only parts skipped")
    parser.add_argument("--sections", default=",".join(map(str, ORDER)),
                        help="comma-separated section numbers to run (all)")
    parser.add_argument("--graph-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.graph_probe or args.nccl_probe) and args.out is None:
        parser.error("--out DIR is required")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; return 0 when no section failed (skipped ones included), else 1."""
    args = parse_args(argv)
    if args.graph_probe:
        print(json.dumps(graph_probe()), flush=True)
        return 0
    if args.nccl_probe:
        nccl_probe()
        return 0
    began = time.monotonic()
    wanted = [int(n) for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device is visible; run with --dry-run to check the "
                         "script on the CPU")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = Context(device=device, dry_run=args.dry_run, scale=DRY if args.dry_run else GPU,
                  out=args.out, work=args.work or Path(tempfile.mkdtemp(prefix="gpu-check-")),
                  deadline=began + args.budget_s,
                  compile_backend="aot_eager" if args.dry_run else "inductor")
    sections = [Section(number, SECTIONS[number][1], key=SECTIONS[number][0])
                for number in sorted(SECTIONS)]
    by_number = {s.number: s for s in sections}
    argv = sys.argv[1:] if argv is None else argv
    report = Report(args.out, {**_header(args, argv, device), "work": str(ctx.work)}, sections)
    for number in sorted(set(SECTIONS) - set(wanted)):
        by_number[number].status, by_number[number].reason = "skipped", "not asked for"
    report.write()
    faulthandler.dump_traceback_later(max(args.budget_s, 0) + WATCHDOG_GRACE_S, exit=True)
    try:
        for number in [n for n in ORDER if n in wanted]:
            section, (_, title, run, needs) = by_number[number], SECTIONS[number]
            if ctx.left() < needs:
                section.status = "skipped"
                section.reason = f"budget: {max(ctx.left(), 0):.0f} s left, it needs ~{needs:.0f} s"
                say(f"section {number} {title}: skipped ({section.reason})")
                report.write()
                continue
            say(f"section {number} {title} ({ctx.left():.0f} s of budget left)")
            section.status = "running"
            report.header["elapsed_s"] = time.monotonic() - began
            report.write()
            started = time.monotonic()
            try:
                run(ctx, section)
                section.settle()
            except Exception as exc:  # noqa: BLE001 - the next sections still run
                section.status, section.reason = "error", _error_text(exc)
                section.notes.append("traceback: " + " | ".join(
                    traceback.format_exc().strip().splitlines()[-6:]))
                print(traceback.format_exc(), file=sys.stderr, flush=True)
            finally:
                if ctx.cuda:
                    torch.cuda.empty_cache()
            section.seconds = time.monotonic() - started
            report.header["elapsed_s"] = time.monotonic() - began
            report.write()
            reason = f" ({section.reason})" if section.reason else ""
            say(f"section {number}: {section.status}{reason} in {section.seconds:.1f} s")
    finally:
        faulthandler.cancel_dump_traceback_later()
    report.header["elapsed_s"] = time.monotonic() - began
    report.write()
    print(f"report: {args.out / 'gpu_check.md'} ({report.header['elapsed_s']:.0f} s)")
    return 1 if any(s.status in ("fail", "error") for s in sections) else 0


if __name__ == "__main__":
    raise SystemExit(main())
