"""Suite-wide setup: build (or load) the fused CPU kernel once, in the main process.

On a fresh machine the first Sophia step compiles the kernel (20-60 s). Doing it here, before
any test, keeps that cost out of the tests that fork or launch several processes and have
time limits of their own; it is a no-op when the kernel is cached or disabled.
"""

from __future__ import annotations

import time


def pytest_sessionstart(session) -> None:  # noqa: ARG001 - pytest's hook signature
    from sophia_pytorch._kernel import loader as fused
    from sophia_pytorch.functional import fused_kernel_available

    start = time.perf_counter()
    available = fused_kernel_available()
    info = fused.build_info()
    if info is not None and not info.cached:
        print(f"\nsophia: built the fused CPU kernel in {time.perf_counter() - start:.1f} s")
    elif not available:
        print(f"\nsophia: fused CPU kernel unavailable: {fused.unavailable_reason()}")
