"""`python -m benchmarks.gpu_check` and `python benchmarks/gpu_check` (the folder as a script)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a folder: make ``benchmarks`` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu_check.driver import main  # noqa: E402 - after the path fix above

if __name__ == "__main__":
    raise SystemExit(main())
