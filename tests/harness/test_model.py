"""The GPT: shapes, causality, weight tying, and every preset builds and takes a step."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sophia_pytorch.harness.config import PRESETS, make_config
from sophia_pytorch.harness.model import GPT, GPTConfig, lm_loss
from sophia_pytorch.harness.optimizers import build_optimizer, build_refresh


def expected_parameters(vocab: int, block: int, layers: int, width: int) -> int:
    # Per block: qkv (3d^2 + 3d), attention proj (d^2 + d), fc (4d^2 + 4d), mlp proj
    # (4d^2 + d), two LayerNorms (4d). Plus token and position tables and the final LayerNorm;
    # the output layer shares the token table.
    per_block = 12 * width * width + 13 * width
    return layers * per_block + vocab * width + block * width + 2 * width


def test_logits_have_shape_batch_time_vocab():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16))
    logits = model(torch.randint(50, (3, 8)))
    assert logits.shape == (3, 8, 50)


def test_output_layer_is_tied_to_token_embedding():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert model.lm_head.weight is model.wte.weight


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(50, (1, 8))
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % 50
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(GPTConfig(vocab_size=50, block_size=4, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_tiny_preset_has_about_a_million_parameters():
    shape = make_config("tiny").model
    model = GPT(GPTConfig(vocab_size=256, block_size=shape.block_size, n_layer=shape.n_layer,
                          n_head=shape.n_head, n_embd=shape.n_embd))
    count = model.num_parameters()
    assert count == expected_parameters(256, shape.block_size, shape.n_layer, shape.n_embd)
    assert 0.5e6 < count < 1.5e6


def test_small_preset_is_bpe_context_256_and_5_to_10m_parameters():
    """BPE ~8k, context 256, 5-10M parameters, 2000 steps."""
    config = make_config("small")
    shape, data = config.model, config.data
    assert data.tokenizer == "bpe" and data.bpe_vocab_size == 8192
    assert shape.block_size == 256 and config.run.max_steps == 2000
    model = GPT(GPTConfig(vocab_size=data.bpe_vocab_size, block_size=shape.block_size,
                          n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd))
    count = model.num_parameters()
    assert count == expected_parameters(data.bpe_vocab_size, shape.block_size, shape.n_layer,
                                        shape.n_embd)
    assert 5e6 < count < 10e6


@pytest.mark.parametrize("name, layers, heads, width", [
    ("gpt2-small", 12, 12, 768), ("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280),
])
def test_gpt2_presets_have_the_paper_shapes(name, layers, heads, width):
    config = make_config(name)
    shape, run = config.model, config.run
    assert (shape.n_layer, shape.n_head, shape.n_embd) == (layers, heads, width)
    assert run.batch_size * run.grad_accum == 480 and shape.block_size == 1024
    warmup = 4000 if name == "gpt2-small" else 2000  # gpt2-small: Wen et al.'s Sophia warmup
    assert run.max_steps == 100_000 and config.optimizer.warmup_steps == warmup
    assert config.optimizer.grad_clip == 1.0 and run.dtype == "bfloat16"
    assert config.optimizer.refresh_every == 10
    vocab = config.data.bpe_vocab_size
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=vocab, block_size=shape.block_size,
                              n_layer=layers, n_head=heads, n_embd=width))
    assert model.num_parameters() == expected_parameters(vocab, 1024, layers, width)


@pytest.mark.parametrize("name, adamw, sophiag", [
    ("gpt2-medium", (3e-4, 6e-5), (7e-4, 1e-5, 0.08)),
    ("gpt2-large", (2e-4, 1e-5), (3e-4, 1e-5, 0.05)),
])
def test_gpt2_presets_carry_the_paper_hyperparameters(name, adamw, sophiag):
    adam = make_config(name, {"optimizer": "adamw"}).optimizer
    assert (adam.lr, adam.min_lr, adam.betas, adam.weight_decay) == (*adamw, (0.9, 0.95), 0.1)
    soph = make_config(name, {"optimizer": "sophiag"}).optimizer
    assert (soph.lr, soph.min_lr, soph.rho) == sophiag
    assert (soph.betas, soph.weight_decay) == ((0.965, 0.99), 0.2)


def test_gpt2_small_carries_wen_et_als_tuned_130m_sophia_settings():
    """lr 4e-3, β (0.95, 0.99), decay 0.2, floor 0, γ 0.0125 → ρ 0.0125 (the mapping:
    tests/optim/test_rho_mapping.py), warmup 4000 (500 and 1000 diverged there); AdamW keeps
    the Sophia paper's row."""
    for name in ("sophiag", "sophiah"):
        soph = make_config("gpt2-small", {"optimizer": name}).optimizer
        assert (soph.lr, soph.min_lr, soph.betas, soph.weight_decay, soph.rho) == (
            4e-3, 0.0, (0.95, 0.99), 0.2, 0.0125)
        assert soph.warmup_steps == 4000
    adam = make_config("gpt2-small", {"optimizer": "adamw"}).optimizer
    assert (adam.lr, adam.min_lr, adam.betas, adam.weight_decay) == (6e-4, 3e-5, (0.9, 0.95), 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_takes_a_sophiag_step_and_refresh_on_cpu(name):
    """Full width and vocabulary; one block, float32: the presets' plumbing, on a laptop.

    (bfloat16 autocast on a CPU without bf16 matrix units is several times slower than
    float32; the loop's bf16 path is tested on the tiny model in test_harness_train.)
    """
    config = make_config(name, {"n_layer": 1, "dtype": "float32", "refresh_every": 1})
    vocab = 256 if config.data.tokenizer == "byte" else config.data.bpe_vocab_size
    shape = config.model
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=shape.block_size, n_layer=shape.n_layer,
                          n_head=shape.n_head, n_embd=shape.n_embd))
    optimizer = build_optimizer(config, model)
    x, y = torch.randint(vocab, (2, 2, 8)).unbind(0)
    loss = lm_loss(model(x), y)
    loss.backward()
    before = model.wte.weight.detach().clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.wte.weight)
    refresh = build_refresh(config, optimizer, model, autocast=contextlib.nullcontext,
                            device=torch.device("cpu"))
    assert refresh([(x, y)], key=0)  # owed after the first step at refresh_every = 1
    assert all(s["hessian"].abs().sum() > 0 for s in optimizer.state.values())


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiah", "adamw", "lion"])
def test_every_optimizer_builds_with_decay_on_matrices_only(optimizer):
    config = make_config("tiny", {"optimizer": optimizer})
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    built = build_optimizer(config, model)
    decayed, plain = built.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and decayed["weight_decay"] > 0
    assert all(p.dim() < 2 for p in plain["params"]) and plain["weight_decay"] == 0
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
