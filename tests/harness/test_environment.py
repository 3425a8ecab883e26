"""The machine a run meets: its memory estimate, the device "auto" means, the main process."""

from __future__ import annotations

import pytest
import torch

from sophia_pytorch.harness import distributed, memory
from sophia_pytorch.harness.config import make_config
from sophia_pytorch.harness.errors import SophiaError
from sophia_pytorch.harness.model import GPT, GPTConfig


@pytest.mark.parametrize("shape", [dict(n_layer=1, n_head=2, n_embd=16, block_size=8),
                                   dict(n_layer=3, n_head=4, n_embd=32, block_size=24)])
def test_the_model_estimate_is_sixteen_bytes_per_actual_parameter(shape):
    config = make_config("tiny", shape)
    model = GPT(GPTConfig(vocab_size=256, dropout=0.0, **shape))
    counted = sum(p.numel() for p in model.parameters())  # the tied head counted once
    assert memory.estimate_memory(config, vocab_size=256)["model"] == 16 * counted


def test_a_cpu_run_larger_than_the_machine_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(memory.os, "sysconf",
                        lambda name: 4096 if name == "SC_PAGE_SIZE" else 2**18)  # 1 GiB
    config = make_config("gpt2-large", {"device": "cpu"})
    with pytest.raises(SophiaError, match=r"needs at least .* GiB .*more than the 1 GiB here"):
        memory.check_memory(config, 50304, torch.device("cpu"))
    memory.check_memory(make_config("tiny"), 256, torch.device("cpu"))  # fits


def test_auto_is_resolved_in_one_place():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device("auto").type == expected
    assert distributed.init_from_env("auto").device.type == expected
    assert distributed.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cpu:1", "nonsense:x"])
def test_an_unknown_device_is_a_one_line_error(name):
    with pytest.raises(SophiaError, match="unknown device"):
        distributed.resolve_device(name)


def test_without_a_process_group_this_is_the_main_process():
    assert not distributed.is_initialized() and distributed.is_main_process()
