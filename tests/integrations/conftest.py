"""The integration tests train tiny models: one intra-op thread each.

On a busy 2-core machine two OpenMP threads make a tiny forward and backward several hundred
times slower (they wait for each other's core); one thread keeps every run in milliseconds.
Module scope, so that the module-scoped fixtures that train (and the processes they fork)
run on one thread too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
