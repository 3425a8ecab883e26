"""The fused CPU path of the Sophia step: one pass over memory per parameter.

The step reads θ, g, m, h and writes θ, m: 24 bytes per float32 coordinate, and nothing else
if it is done in one pass. The for-loop and foreach paths make about nine passes (each torch
op reads and writes whole tensors), so on a CPU, where the step is bound by memory bandwidth,
a single loop is several times faster. ``sophia_step.cpp`` (beside this file) is that loop,
threaded with
``at::parallel_for``; it rounds exactly as ``_single_tensor_sophia`` does, so the fused path
is bitwise equal to the ground truth and can be the default.

The kernel is compiled on first use with torch's C++ extension machinery (a C++ compiler and
ninja are needed; ``-march=native`` is safe because it is built on the machine that runs it),
which took 12-20 s on a 2-core machine, and cached in ``$TORCH_EXTENSIONS_DIR`` or torch's
default extension root, keyed by the source, the torch and Python versions and the CPU's
features, so later processes load it in a fraction of a second. torch.compile of the foreach
path was the other candidate: it fuses too, but it rounds differently (it is not bitwise equal
to the for-loop) and compiles for longer.
Where it cannot be built (no compiler or no ninja is found before any build starts; or the
build fails) the optimizers fall back to the other paths with one warning that names the cause
in one line; set ``SOPHIA_DISABLE_FUSED=1`` to never try.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["BuildInfo", "build_info", "fused_sophia_", "is_available", "unavailable_reason"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("sophia_step.cpp")
# -ffp-contract=off: the compiler must not fuse a multiply and an add that torch rounds
# separately; the fused multiply-adds torch does make are written out as std::fma.
# -mprefer-vector-width=512: where the CPU has AVX-512, the bf16-state loop (its rounding is
# integer work) runs 15-20% faster in 512-bit vectors; the float32 loop is unchanged.
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off",
           "-fno-math-errno", "-fopenmp"]
_DISABLE_ENV = "SOPHIA_DISABLE_FUSED"


@dataclass(frozen=True)
class BuildInfo:
    """How the kernel was obtained in this process.

    Attributes:
        name: extension name, ``sophia_step_<hash>``.
        directory: where the compiled library is cached.
        seconds: wall time of the load, compilation included when ``cached`` is False.
        cached: True when a library built earlier was loaded, False when it was compiled now.
    """

    name: str
    directory: Path
    seconds: float
    cached: bool


_lock = threading.Lock()
# torch.ops.sophia_fused.step once loaded and checked; the kernel returns the skipped indices
_op: Callable[..., list[int]] | None = None
_build: BuildInfo | None = None
_failure: str | None = None
_tried = False
_warned = False


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _extension_name(source: bytes) -> str:
    key = hashlib.sha256()
    for part in (source, torch.__version__.encode(), sys.version.encode(),
                 " ".join(_CFLAGS).encode(), platform.machine().encode(),
                 _cpu_identity().encode()):
        key.update(part)
        key.update(b"\0")
    return f"sophia_step_{key.hexdigest()[:16]}"


def _load(reference: Callable[..., None]) -> None:
    global _op, _build, _failure, _tried
    _tried = True
    if os.environ.get(_DISABLE_ENV, "").strip() not in ("", "0"):
        _failure = f"disabled by {_DISABLE_ENV}"
        return
    try:
        from torch.utils import cpp_extension

        source = _SOURCE.read_bytes()
        name = _extension_name(source)
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        directory = Path(root) / name
        directory.mkdir(parents=True, exist_ok=True)
        library = directory / f"{name}.so"
        start = time.perf_counter()
        cached = library.exists()
        if cached:
            try:  # the name carries the source hash: an existing library is up to date
                # torch leaves _Ops.load_library unannotated (torch 2.13)
                torch.ops.load_library(str(library))  # type: ignore[no-untyped-call]
            except OSError:  # a build cut short; let the extension machinery redo it
                cached = False
        if not cached:
            missing = _missing_build_tool()
            if missing is not None:  # fail before announcing a build that cannot start
                _failure = missing
                return
            logger.warning(
                "sophia: compiling the fused CPU kernel of the Sophia step, once (10-60 s); "
                "it is cached in %s. Pass fused=False to skip it.", directory,
            )
            _remove_stale_lock(directory / "lock")
            cpp_extension.load(
                name=name, sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                build_directory=str(directory), is_python_module=False, verbose=False,
            )
        _build = BuildInfo(name, directory, time.perf_counter() - start, cached)
        if not cached:
            logger.warning("sophia: fused kernel built in %.1f s", _build.seconds)
        op = torch.ops.sophia_fused.step
        if not _rounds_as_torch_does(op, reference):
            _failure = (
                "the compiled kernel does not round as this torch build does (CPU capability "
                f"{torch.backends.cpu.get_cpu_capability()})"
            )
            return
        _op = op
    except Exception as error:  # no compiler, no ninja, no source file, a failed build …
        _failure = f"{type(error).__name__}: {error}".strip()


def _missing_build_tool() -> str | None:
    """Why the kernel cannot be built here, checked before any build: no C++ compiler (the
    ``CXX`` torch's extension builder runs, ``c++`` by default) or no ninja; else None."""
    from torch.utils import cpp_extension

    compiler = (os.environ.get("CXX", "").strip() or "c++").split()[0]
    if shutil.which(compiler) is None:
        return (f"{compiler}: not found; the fused kernel is compiled on first use and needs a "
                "C++ compiler (install g++ or clang++, or point CXX at one)")
    if not cpp_extension.is_ninja_available():
        return ("ninja: not found; the fused kernel is built with ninja "
                "(pip install ninja, or the `fused` extra: pip install 'sophia-pytorch[fused]')")
    return None


# lines of a build log that name its cause, most telling first
_CAUSES = [re.compile(p) for p in (r": not found\b", r"fatal error", r"\berror:", r"No such file",
                                   r"Permission denied", r"No space left")]


def _cause(failure: str) -> str:
    """The one line of a failure that says what went wrong (a build log's ``c++: not
    found`` or first compiler error, not its opening command line), at most 200 characters."""
    lines = [line.strip() for line in failure.splitlines() if line.strip()]
    for pattern in _CAUSES:
        for line in lines:
            if pattern.search(line):
                return line[:200]
    return lines[0][:200] if lines else failure


def _remove_stale_lock(lock: Path, *, older_than_s: float = 600.0) -> None:
    """Delete the build lock a killed build left behind.

    torch's extension builder waits, without a time limit, for another process's lock file to
    go; a build killed midway leaves it, and every later process would wait forever. A build
    here takes well under a minute, so a lock ten minutes old is stale.
    """
    try:
        if time.time() - lock.stat().st_mtime > older_than_s:
            lock.unlink()
            logger.warning("sophia: removed a stale build lock %s", lock)
    except FileNotFoundError:
        pass


def _rounds_as_torch_does(op: Callable[..., object], reference: Callable[..., None]) -> bool:
    """Whether the kernel is bitwise equal to ``reference`` (the for-loop) on a small probe.

    The kernel mirrors the fused multiply-adds of torch's vectorised CPU kernels; a torch
    running its non-vectorised kernels (``ATEN_CPU_CAPABILITY=default``, or a CPU without
    FMA) rounds differently, and then the fused path must not be the default. The probe covers
    float32, float64, and float32 parameters with bfloat16 state.
    """
    generator = torch.Generator().manual_seed(0)
    hyper = dict(lr=3e-3, beta1=0.965, rho=0.04, weight_decay=0.1, eps=1e-15, maximize=False)
    key = 0x1234567
    for dtype, state_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                               (torch.float32, torch.bfloat16)):
        probe = [torch.randn(1031, generator=generator, dtype=dtype) for _ in range(4)]
        probe[2].mul_(0.05)
        probe[3].abs_()[::5] *= -1
        probe[2:] = [t.to(state_dtype) for t in probe[2:]]
        expected = [[t.clone()] for t in probe]
        actual = [[t.clone()] for t in probe]
        keys = ([key],) if state_dtype == torch.bfloat16 else ()  # float state takes none
        reference(*expected, **hyper, rounding_keys=keys[0] if keys else None)
        op(*actual, 1 - hyper["lr"] * hyper["weight_decay"], hyper["beta1"],
           1 - hyper["beta1"], hyper["rho"], hyper["eps"], -hyper["lr"], False, *keys)
        if not all(torch.equal(a[0], e[0]) for a, e in zip(actual, expected, strict=True)):
            return False
    return True


def is_available(reference: Callable[..., None]) -> bool:
    """Whether the fused kernel can be used, building or loading it on the first call.

    Args:
        reference: the for-loop step (``sophia_pytorch.functional._single_tensor_sophia``)
            that the kernel must equal bitwise on a probe before it is used. The loader is
            handed it rather than importing it, so that it stays a leaf module.
    """
    with _lock:
        if not _tried:
            _load(reference)
    return _op is not None


def unavailable_reason(*, full: bool = False) -> str | None:
    """Why the fused kernel is unavailable, in one line naming the cause (e.g. ``c++: not
    found``); with ``full=True`` the whole message, build log included. None when it is
    available or not yet tried."""
    if _failure is None or full:
        return _failure
    return _cause(_failure)


def build_info() -> BuildInfo | None:
    """Name, cache directory and load time of the kernel; None until it has been loaded."""
    return _build


def warn_unavailable_once() -> None:
    """Warn, once per process, that the default fused path fell back (unless disabled)."""
    global _warned
    if _warned or _failure is None or _failure.startswith("disabled"):
        return
    _warned = True
    warnings.warn(
        f"sophia: the fused CPU kernel is unavailable: {_cause(_failure)} -- using the slower "
        "unfused step. Pass fused=False (or set SOPHIA_DISABLE_FUSED=1) to silence this; "
        "the build log: sophia_pytorch._kernel.loader.unavailable_reason(full=True).",
        RuntimeWarning,
        stacklevel=3,
    )


def fused_sophia_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    rounding_keys: list[int] | None = None,
) -> list[int]:
    """The Sophia step, in place, on every tensor the kernel supports.

    The arguments are those of :func:`sophia_pytorch.functional.sophia_update`. Supported are dense
    CPU tensors whose θ, g, m, h share one layout, in float32 or float64 (or complex of
    those), or with bfloat16/float16 θ and g and float32 m and h, or with float32, bfloat16 or
    float16 θ and g and bfloat16 m and h (stochastically rounded with ``rounding_keys``, which
    such tensors need). A Tensor ``lr`` is not.

    Returns:
        the indices of the tensors left untouched, for the caller's unfused path.

    Raises:
        RuntimeError: the kernel is unavailable; see :func:`unavailable_reason`.
        ValueError: bfloat16 state without ``rounding_keys``.
    """
    if _op is None:
        reason = _failure or "call is_available first"
        raise RuntimeError(f"sophia: the fused kernel is not loaded: {reason}")
    if isinstance(lr, Tensor):
        return list(range(len(params)))
    if rounding_keys is None:
        if any(m.dtype == torch.bfloat16 for m in exp_avgs):
            raise ValueError("bfloat16 state needs rounding_keys: one stochastic-rounding key "
                             "per tensor (see sophia_pytorch._rounding.rounding_key)")
        rounding_keys = []
    return _op(
        params, grads, exp_avgs, hessians,
        1 - lr * weight_decay, beta1, 1 - beta1, rho, eps, -lr, maximize, rounding_keys,
    )
