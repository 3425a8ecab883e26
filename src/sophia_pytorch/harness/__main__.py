"""``python -m sophia_pytorch.harness ...`` runs the ``sophia`` command (also under torchrun)."""

import os
import sys

from sophia_pytorch.harness.cli import main

if __name__ == "__main__":
    status = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Under torchrun, a rank's interpreter teardown sometimes aborted after the process
        # group was destroyed ("terminate called without an active exception", a C++ thread
        # still joinable at static destruction; 1 run in 3 on a loaded 2-core machine, 0 in
        # 6 with this), and torchrun reports that as a failed job. The work is done and every
        # file is closed by now: flush and leave without running C++ static destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
