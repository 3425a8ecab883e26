"""GPU evidence in one command: six checks of the library and harness on one NVIDIA GPU.

    python -m benchmarks.gpu_check --out benchmarks/gpu/<name>      # on the GPU machine
    python -m benchmarks.gpu_check --out /tmp/gpu-check --dry-run   # anywhere, on CPU

(``python benchmarks/gpu_check …`` runs the same from any folder.) One module per section:
``correctness``, ``no_sync``, ``step_time``, ``refresh_cost``, ``compare``, ``ddp``; ``report``
writes the report, ``driver`` runs the sections within the budget.

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

from .driver import ORDER, SECTIONS, main

__all__ = ["ORDER", "SECTIONS", "main"]
