"""``SophiaTrainer``: the Hessian refresh inside Hugging Face's Trainer, on a tiny GPT-2 on CPU.

Every run spies on the optimizer's ``update_hessian`` (what the optimizer was given, when) and
on the refresh's forward (which positions it sampled), and checks them against what the batch
and the step count say it must be.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from sophia_pytorch import SophiaG, SophiaH  # noqa: E402
from sophia_pytorch.integrations.transformers import SophiaTrainer  # noqa: E402
from tests.integrations.helpers import (  # noqa: E402
    LENGTH,
    PAD,
    VOCAB,
    RefreshSpy,
    hessians_of,
    run_ddp_worker,
    token_rows,
)


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
    return GPT2LMHeadModel(config)


def _args(folder, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(folder), per_device_train_batch_size=8, max_steps=12, use_cpu=True,
        report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        learning_rate=3e-3, weight_decay=0.1, seed=0, dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class SpiedTrainer(SophiaTrainer):
    """Records micro-batches, refresh forwards (batch labels, mask, logits' gradient) and, in
    ``spy``, the optimizer's refreshes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches: list[torch.Tensor] = []
        self.forwards: list[dict] = []
        self.spy: RefreshSpy | None = None

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.spy is None:
            self.spy = RefreshSpy.attach(optimizer)
        return optimizer

    def training_step(self, model, inputs, *args, **kwargs):
        self.micro_batches.append(inputs["labels"].clone())
        return super().training_step(model, inputs, *args, **kwargs)

    def hessian_logits_and_mask(self, model, inputs):
        head_dtypes = []
        hook = model.lm_head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
        logits, mask = super().hessian_logits_and_mask(model, inputs)
        hook.remove()
        record = {"labels": inputs["labels"].clone(), "mask": mask.clone(),
                  "head_dtype": head_dtypes[0]}
        logits.register_hook(lambda grad: record.__setitem__("logits_grad", grad.clone()))
        self.forwards.append(record)
        return logits, mask


def _train(folder, rows=96, optimizer=None, sophia_kwargs=None, scaler=None, **overrides):
    model = _gpt2()
    trainer = SpiedTrainer(
        model=model, args=_args(folder, **overrides), train_dataset=token_rows(rows),
        optimizers=(optimizer(model) if optimizer else None, None),
        sophia_kwargs=sophia_kwargs,
    )
    if optimizer:
        trainer.spy = RefreshSpy.attach(trainer.optimizer)
    if scaler is not None:  # accelerate makes no GradScaler on CPU; hand it one before train()
        trainer.accelerator.scaler = scaler
    trainer.train()
    return trainer


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ------------------------------------------------------------------------ SophiaG, built


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> SophiaTrainer:
    """SophiaG built from the arguments; 24 steps, refresh every 3."""
    return _train(tmp_path_factory.mktemp("built"), max_steps=24,
                  sophia_kwargs={"rho": 0.05, "refresh_every": 3})


def test_sophiag_is_built_from_training_arguments_and_sophia_kwargs(built):
    optimizer = built.optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
    assert type(optimizer) is SophiaG
    assert [g["initial_lr"] for g in optimizer.param_groups] == [3e-3, 3e-3]
    assert all(g["rho"] == 0.05 and g["refresh_every"] == 3 for g in optimizer.param_groups)
    names = {id(p): n for n, p in built.model.named_parameters()}
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or ".ln_" in names[id(p)]
               for p in not_decayed["params"])
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(names)


def test_refreshes_at_the_optimizer_equal_steps_over_k(built):
    assert [call.steps_taken for call in built.spy.calls] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert all(call.folded and call.grad_scale is None for call in built.spy.calls)
    assert all(forward["head_dtype"] == torch.float32 for forward in built.forwards)
    assert built.hessian_refreshes == 24 // 3 and built.hessian_refreshes_skipped == 0


def test_hessian_is_finite_and_nonzero_for_every_parameter(built):
    for hessian in hessians_of(built.optimizer.optimizer):
        assert torch.isfinite(hessian).all() and hessian.abs().sum() > 0


def test_loss_falls(built):
    losses = _losses(built)
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses


def test_refresh_samples_only_positions_with_a_next_token_label(built):
    """The mask pairs logits[:, t] with labels[:, t + 1] and leaves out -100; no gradient
    reaches the logits of the positions left out; B is the count of the others."""
    assert len(built.forwards) == len(built.spy.calls)
    for forward, call in zip(built.forwards, built.spy.calls):
        expected = forward["labels"][:, 1:] != -100
        assert (~expected).any()  # the data have padding to leave out
        assert torch.equal(forward["mask"], expected)
        assert call.scale == int(expected.sum())
        grad = forward["logits_grad"]
        assert grad.shape[:2] == expected.shape
        assert (grad[~expected] == 0).all() and (grad[expected].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------ gradient accumulation


def test_one_refresh_per_optimizer_step_under_gradient_accumulation(tmp_path):
    """3 micro-batches per step, 6 steps, refresh every 2: 18 micro-batches, 3 refreshes, each
    on the last micro-batch of its step."""
    trainer = _train(tmp_path, max_steps=6, gradient_accumulation_steps=3,
                     sophia_kwargs={"refresh_every": 2})
    assert len(trainer.micro_batches) == 18
    assert [call.steps_taken for call in trainer.spy.calls] == [2, 4, 6]
    for forward, step in zip(trainer.forwards, (2, 4, 6)):
        assert torch.equal(forward["labels"], trainer.micro_batches[3 * step - 1])


def test_refresh_at_start_refreshes_once_before_the_first_step(tmp_path):
    trainer = _train(tmp_path, max_steps=4, gradient_accumulation_steps=2,
                     sophia_kwargs={"refresh_every": 2, "refresh_at_start": True})
    assert [call.steps_taken for call in trainer.spy.calls] == [0, 2, 4]
    assert torch.equal(trainer.forwards[0]["labels"], trainer.micro_batches[0])


# --------------------------------------------------------------------- precision, SophiaH


def test_a_gradscaler_leaves_the_run_as_it_is_without_one(tmp_path):
    """fp32 with a GradScaler at 2^12 (exact: a power of two): the refresh scales its loss by
    the scaler's scale and update_hessian unscales, so h and the parameters are those of a
    run without a scaler — were the scale not undone, h would be 2^24 times larger."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    # no clipping: accelerate unscales before clipping only when it made the scaler itself
    settings = dict(max_steps=6, max_grad_norm=0.0, sophia_kwargs={"refresh_every": 2})
    scaled = _train(tmp_path / "scaled", scaler=scaler, **settings)
    plain = _train(tmp_path / "plain", **settings)
    assert [call.grad_scale for call in scaled.spy.calls] == [2.0**12] * 3
    assert scaler.get_scale() == 2.0**12 and scaler._growth_tracker.item() == 6
    for h_scaled, h_plain in zip(hessians_of(scaled.optimizer.optimizer),
                                 hessians_of(plain.optimizer.optimizer), strict=True):
        torch.testing.assert_close(h_scaled, h_plain, rtol=1e-5, atol=1e-12)
    for p, q in zip(scaled.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_bf16_run_refreshes_in_bf16_with_finite_nonzero_hessian(tmp_path):
    """The refresh forward runs under the Trainer's autocast (the head computes in bf16)."""
    trainer = _train(tmp_path, rows=32, max_steps=4, bf16=True,
                     sophia_kwargs={"refresh_every": 2})
    assert [call.steps_taken for call in trainer.spy.calls] == [2, 4]
    assert [forward["head_dtype"] for forward in trainer.forwards] == [torch.bfloat16] * 2
    for hessian in hessians_of(trainer.optimizer.optimizer):
        assert torch.isfinite(hessian).all() and hessian.abs().sum() > 0


def test_sophiah_refreshes_through_a_closure(tmp_path):
    trainer = _train(tmp_path, max_steps=6,
                     optimizer=lambda m: SophiaH(m.parameters(), lr=3e-3, refresh_every=3))
    assert [call.steps_taken for call in trainer.spy.calls] == [3, 6]
    assert trainer.forwards == []  # no sampled-label forward: the model's own loss
    for hessian in hessians_of(trainer.optimizer.optimizer):
        assert torch.isfinite(hessian).all() and hessian.abs().sum() > 0


# --------------------------------------------------------------------------- bad input


def test_sophia_kwargs_may_not_set_the_learning_rate(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        SophiaTrainer(model=_gpt2(), args=_args(tmp_path), sophia_kwargs={"lr": 1e-3})


def test_sophia_kwargs_with_an_optimizer_passed_is_refused(tmp_path):
    model = _gpt2()
    with pytest.raises(ValueError, match="optimizer was passed"):
        SophiaTrainer(model=model, args=_args(tmp_path), optimizers=(SophiaG(model.parameters()),
                      None), sophia_kwargs={"rho": 0.1})


def test_an_optimizer_that_is_not_sophia_is_named_in_the_error(tmp_path):
    model = _gpt2()
    trainer = SophiaTrainer(model=model, args=_args(tmp_path), train_dataset=token_rows(16),
                            optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(TypeError, match="SophiaG or SophiaH optimizer, got AdamW"):
        trainer.train()


class _NoLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _gpt2()

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return {"loss": out.loss} if labels is not None else {"hidden": out.logits}


def test_a_model_without_logits_gets_a_one_line_error(tmp_path):
    trainer = SophiaTrainer(model=_NoLogits(), args=_args(tmp_path, max_steps=2),
                            train_dataset=token_rows(16), sophia_kwargs={"refresh_every": 1})
    with pytest.raises(ValueError, match="needs model outputs with `logits`.*override"):
        trainer.train()


# ---------------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list[dict]:
    """Two fresh gloo processes under torchrun (tests/integrations/ddp_worker.py), 4 steps,
    refresh every 2; the Trainer gives each rank its own rows."""
    return run_ddp_worker("transformers", tmp_path_factory.mktemp("ddp"))


def test_ddp_ranks_train_on_different_rows_and_end_with_identical_hessians(ddp_runs):
    first, second = ddp_runs
    assert first["world"] == second["world"] == 2
    assert not torch.equal(first["labels"][0], second["labels"][0])
    for h0, h1 in zip(first["hessians"], second["hessians"], strict=True):
        assert torch.equal(h0, h1)
        assert torch.isfinite(h0).all()
    for p0, p1 in zip(first["params"], second["params"], strict=True):
        assert torch.equal(p0, p1)


def test_ddp_refresh_scale_is_the_sample_count_over_both_ranks(ddp_runs):
    first, second = ddp_runs
    assert [step for step, _ in first["calls"]] == [2, 4]
    assert first["calls"] == second["calls"]
    totals = [a + b for a, b in zip(first["local_counts"], second["local_counts"])]
    assert [scale for _, scale in first["calls"]] == totals


def test_sophia_kwargs_state_dtype_bfloat16_keeps_m_and_h_in_bf16(tmp_path):
    trainer = _train(tmp_path, max_steps=4, sophia_kwargs={"state_dtype": torch.bfloat16,
                                                           "refresh_every": 2})
    optimizer = trainer.optimizer.optimizer
    assert optimizer.state_dtype == torch.bfloat16 and optimizer.refreshes_done() == 2
    states = list(optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == s["hessian"].dtype == torch.bfloat16
                          for s in states)
    assert any(bool(s["hessian"].any()) for s in states)
