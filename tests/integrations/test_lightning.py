"""``SophiaHessianCallback`` in a Lightning Trainer, and the manual-optimization recipe for
SophiaH, on a one-block causal transformer on CPU.

Each run spies on the optimizer's ``update_hessian`` and on the callback's forward, and checks
them against what the batch and the step count say they must be.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from sophia_pytorch import SophiaG, SophiaH
from tests.integrations.helpers import (
    RefreshSpy,
    TinyLM,
    hessians_of,
    next_token_pairs,
    run_ddp_worker,
)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


PACKAGES = [name for name in ("lightning.pytorch", "pytorch_lightning") if _importable(name)]
if not PACKAGES:
    pytest.skip("neither lightning nor pytorch_lightning is installed", allow_module_level=True)

from sophia_pytorch.integrations.lightning import SophiaHessianCallback  # noqa: E402
from sophia_pytorch.refresh import hutchinson  # noqa: E402

pl = importlib.import_module(PACKAGES[0])


def _module_class(package):
    class LitLM(package.LightningModule):
        """Next-token cross-entropy of a TinyLM; SophiaG (or ``optimizer``) with a spy."""

        def __init__(self, optimizer=None, **sophia_kwargs):
            super().__init__()
            self.model = TinyLM()
            self.make_optimizer = optimizer or (lambda params: SophiaG(
                params, lr=1e-2, rho=0.05, weight_decay=0.0, **sophia_kwargs))
            self.losses: list[float] = []
            self.micro_batches: list[torch.Tensor] = []
            self.spy: RefreshSpy | None = None

        def forward(self, tokens):
            return self.model(tokens)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            self.micro_batches.append(targets.clone())
            loss = F.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten())
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            optimizer = self.make_optimizer(self.parameters())
            if hasattr(optimizer, "update_hessian"):
                self.spy = RefreshSpy.attach(optimizer)
            return optimizer

    return LitLM


LitLM = _module_class(pl)


class SpiedCallback(SophiaHessianCallback):
    """Records each refresh forward: the batch's targets, the mask, the logits' gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwards: list[dict] = []

    def logits_and_mask(self, pl_module, batch):
        logits, mask = super().logits_and_mask(pl_module, batch)
        record = {"targets": batch[1].clone(), "mask": mask.clone()}
        logits.register_hook(lambda grad: record.__setitem__("logits_grad", grad.clone()))
        self.forwards.append(record)
        return logits, mask


def _fit(module, callbacks, package=pl, rows=64, batch_size=8, **trainer_kwargs):
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    settings.update(trainer_kwargs)
    trainer = package.Trainer(callbacks=callbacks, **settings)
    loader = torch.utils.data.DataLoader(next_token_pairs(rows), batch_size=batch_size)
    trainer.fit(module, loader)
    return trainer


def _optimizer(trainer):
    (optimizer,) = trainer.optimizers
    return optimizer


# ------------------------------------------------------------------------- 32-true run


@pytest.fixture(scope="module", params=PACKAGES)
def fitted(request):
    """12 steps, refresh every 3, with ``lightning.pytorch`` and with ``pytorch_lightning``."""
    package = importlib.import_module(request.param)
    module, callback = _module_class(package)(refresh_every=3), SpiedCallback()
    trainer = _fit(module, [callback], package=package, max_steps=12)
    return trainer, module, callback


def test_refreshes_at_the_optimizer_equal_steps_over_k(fitted):
    trainer, module, callback = fitted
    assert [call.steps_taken for call in module.spy.calls] == [3, 6, 9, 12]
    assert all(call.folded and call.grad_scale is None for call in module.spy.calls)
    assert callback.refreshes == 12 // 3 and trainer.global_step == 12


def test_hessian_is_finite_and_nonzero_for_every_parameter(fitted):
    trainer, _, _ = fitted
    hessians = hessians_of(_optimizer(trainer))
    assert len(hessians) == len(list(trainer.lightning_module.parameters()))
    for hessian in hessians:
        assert torch.isfinite(hessian).all() and hessian.abs().sum() > 0


def test_loss_falls(fitted):
    _, module, _ = fitted
    losses = module.losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


def test_positions_whose_target_is_ignored_are_never_sampled(fitted):
    _, module, callback = fitted
    for forward, call in zip(callback.forwards, module.spy.calls, strict=True):
        expected = forward["targets"] != -100
        assert (~expected).any()
        assert torch.equal(forward["mask"], expected)
        assert call.scale == int(expected.sum())
        grad = forward["logits_grad"]
        assert (grad[~expected] == 0).all() and (grad[expected].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------ gradient accumulation


def test_one_refresh_per_optimizer_step_under_accumulate_grad_batches():
    """3 micro-batches per step, 4 steps, refresh every 2: refreshes after steps 2 and 4, each
    on the last micro-batch of its step."""
    module, callback = LitLM(refresh_every=2), SpiedCallback()
    _fit(module, [callback], max_steps=4, accumulate_grad_batches=3, rows=96)
    assert len(module.micro_batches) == 12
    assert [call.steps_taken for call in module.spy.calls] == [2, 4]
    for forward, step in zip(callback.forwards, (2, 4), strict=True):
        assert torch.equal(forward["targets"], module.micro_batches[3 * step - 1])


def test_a_skipped_refresh_is_not_retried_inside_the_next_accumulation_window():
    """A refresh skipped (non-finite under fp16, here forced) stays due until the next step;
    the callback must not retry it on the next micro-batches, whose accumulated gradients a
    refresh would clear: one attempt per step, and the training gradients reach the step."""
    module, callback = LitLM(refresh_every=1), SophiaHessianCallback()
    steps_seen = []

    def skip_every_refresh(trainer, pl_module):
        optimizer = _optimizer(trainer)
        optimizer.update_hessian = lambda *args, **kwargs: steps_seen.append(
            optimizer.steps_taken()) or False

    callback.on_train_start = lambda trainer, pl_module: (
        SophiaHessianCallback.on_train_start(callback, trainer, pl_module),
        skip_every_refresh(trainer, pl_module))
    reference = LitLM(refresh_every=1000)
    _fit(module, [callback], max_steps=3, accumulate_grad_batches=3)
    _fit(reference, [SophiaHessianCallback()], max_steps=3, accumulate_grad_batches=3)
    assert steps_seen == [1, 2, 3] and callback.refreshes_skipped == 3
    for p, q in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_refresh_at_start_refreshes_once_before_the_first_step():
    module, callback = LitLM(refresh_every=2, refresh_at_start=True), SpiedCallback()
    _fit(module, [callback], max_steps=4, accumulate_grad_batches=2)
    assert [call.steps_taken for call in module.spy.calls] == [0, 2, 4]
    assert torch.equal(callback.forwards[0]["targets"], module.micro_batches[0])


# ------------------------------------------------------------------------------ precision


def test_bf16_mixed_refreshes_with_finite_nonzero_hessian():
    module = LitLM(refresh_every=2)
    trainer = _fit(module, [SophiaHessianCallback()], max_steps=4, precision="bf16-mixed")
    assert [call.steps_taken for call in module.spy.calls] == [2, 4]
    for hessian in hessians_of(_optimizer(trainer)):
        assert torch.isfinite(hessian).all() and hessian.abs().sum() > 0


def test_16_mixed_with_a_gradscaler_unscales_the_refresh():
    """Lightning refuses '16-mixed' on CPU, so the plugin is built by hand: fp16 autocast and
    a GradScaler at 2^12. The refresh hands the scaler's scale to update_hessian, h comes out
    on the scale of a 32-bit run (not 2^24 above it), and the scaler keeps its state."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    plugin = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)
    half = LitLM(refresh_every=2)
    half_trainer = _fit(half, [SophiaHessianCallback()], max_steps=4, plugins=[plugin])
    full = LitLM(refresh_every=2)
    full_trainer = _fit(full, [SophiaHessianCallback()], max_steps=4)
    assert [(c.steps_taken, c.grad_scale, c.folded) for c in half.spy.calls] == [
        (2, 2.0**12, True), (4, 2.0**12, True)]
    assert scaler.get_scale() == 2.0**12 and scaler._growth_tracker.item() == 4
    half_total = sum(float(h.sum()) for h in hessians_of(_optimizer(half_trainer)))
    full_total = sum(float(h.sum()) for h in hessians_of(_optimizer(full_trainer)))
    assert 0.5 < half_total / full_total < 2.0, (half_total, full_total)


# ---------------------------------------------------------------------- other batch shapes


class DictBatches(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        inputs, targets = self.pairs[index]
        return {"tokens": inputs, "next": targets}


class LitDictLM(LitLM):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["tokens"], batch["next"]), batch_idx)


def _fit_dicts(callback, steps=2):
    module = LitDictLM(refresh_every=1)
    trainer = pl.Trainer(callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=steps)
    trainer.fit(module, torch.utils.data.DataLoader(DictBatches(next_token_pairs(32)),
                                                    batch_size=8))
    return module


def test_logits_fn_reads_other_batch_shapes():
    def logits_fn(pl_module, batch):
        return pl_module(batch["tokens"]), batch["next"] != -100

    module = _fit_dicts(SophiaHessianCallback(logits_fn))
    assert [call.steps_taken for call in module.spy.calls] == [1, 2]


def test_a_batch_it_cannot_read_gets_a_one_line_error_naming_logits_fn():
    with pytest.raises(ValueError, match=r"shaped \(inputs, targets\), got dict; pass logits_fn"):
        _fit_dicts(SophiaHessianCallback(), steps=1)


def test_sophiah_in_the_callback_points_to_the_manual_recipe():
    module = LitLM(optimizer=lambda params: SophiaH(params, lr=1e-3))
    with pytest.raises(TypeError, match="manual optimization"):
        _fit(module, [SophiaHessianCallback()], max_steps=1)


# ------------------------------------------------------ SophiaH: manual optimization recipe


class LitSophiaH(pl.LightningModule):
    """The recipe of docs/INTEGRATIONS.md: step, then refresh when due, in training_step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.model = TinyLM()
        self.probes = torch.Generator().manual_seed(0)  # the same seed on every rank
        self.losses: list[float] = []

    def loss(self, batch):
        inputs, targets = batch
        return F.cross_entropy(self.model(inputs).flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self.loss(batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        sophia = optimizer.optimizer
        if sophia.hessian_due():
            hutchinson(sophia, lambda: self.loss(batch), generator=self.probes,
                               scaler=getattr(self.trainer.precision_plugin, "scaler", None))
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        optimizer = SophiaH(self.parameters(), lr=1e-2, rho=0.05, weight_decay=0.0,
                            refresh_every=3)
        self.spy = RefreshSpy.attach(optimizer)
        return optimizer


def test_sophiah_manual_optimization_recipe_refreshes_every_k_steps_and_learns():
    module = LitSophiaH()
    trainer = _fit(module, [], max_steps=12)
    assert [call.steps_taken for call in module.spy.calls] == [3, 6, 9, 12]
    for hessian in hessians_of(_optimizer(trainer)):
        assert torch.isfinite(hessian).all() and hessian.abs().sum() > 0
    assert sum(module.losses[-3:]) / 3 < sum(module.losses[:3]) / 3 - 0.3, module.losses


# ---------------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list[dict]:
    """Two fresh gloo processes under torchrun (tests/integrations/ddp_worker.py) with
    Lightning's ``ddp`` strategy, 4 steps, refresh every 2; each rank reads its own half of
    every global batch."""
    return run_ddp_worker("lightning", tmp_path_factory.mktemp("lightning_ddp"))


def test_ddp_ranks_end_with_identical_hessians_and_parameters(ddp_runs):
    first, second = ddp_runs
    assert first["world"] == second["world"] == 2
    assert not torch.equal(first["labels"][0], second["labels"][0])
    for h0, h1 in zip(first["hessians"], second["hessians"], strict=True):
        assert torch.equal(h0, h1) and torch.isfinite(h0).all()
    for p0, p1 in zip(first["params"], second["params"], strict=True):
        assert torch.equal(p0, p1)


def test_ddp_refresh_scale_is_the_sample_count_over_both_ranks(ddp_runs):
    first, second = ddp_runs
    assert [step for step, _ in first["calls"]] == [2, 4]
    assert first["calls"] == second["calls"]
    totals = [a + b for a, b in zip(first["local_counts"], second["local_counts"])]
    assert [scale for _, scale in first["calls"]] == totals


# ------------------------------------------- manual optimization, other likelihoods


class LitTwoStepsPerBatch(LitLM):
    """Manual optimization: two optimizer steps per batch, on its two halves."""

    def __init__(self, **sophia_kwargs):
        super().__init__(**sophia_kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        inputs, targets = batch
        for half in (slice(0, len(inputs) // 2), slice(len(inputs) // 2, None)):
            loss = F.cross_entropy(self(inputs[half]).flatten(0, 1), targets[half].flatten())
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self.losses.append(float(loss.detach()))


def test_manual_optimization_with_two_steps_per_batch_gets_every_refresh():
    """Refresh every step, 3 batches of 2 steps: 6 refreshes, one after each step (the
    callback used to look only at batch end, and refreshed 3 times)."""
    module, callback = LitTwoStepsPerBatch(refresh_every=1), SophiaHessianCallback()
    _fit(module, [callback], max_steps=6, rows=24)
    assert [call.steps_taken for call in module.spy.calls] == [1, 2, 3, 4, 5, 6]
    assert callback.refreshes == 6


class LitRegression(pl.LightningModule):
    """A two-output MSE regression on float targets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 2))

    def forward(self, inputs):
        return self.net(inputs)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.mse_loss(self(inputs), targets)

    def configure_optimizers(self):
        optimizer = SophiaG(self.parameters(), lr=1e-2, refresh_every=1)
        self.spy = RefreshSpy.attach(optimizer)
        return optimizer


def _fit_regression(callback, steps=2):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 3, generator=generator)
    data = torch.utils.data.TensorDataset(inputs, inputs[:, :2].sin())
    module = LitRegression()
    trainer = pl.Trainer(callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=steps)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return trainer, module


def test_regression_with_hessian_loss_gaussian_gets_a_nonzero_hessian():
    trainer, module = _fit_regression(SophiaHessianCallback(hessian_loss="gaussian"))
    assert [(call.steps_taken, call.scale) for call in module.spy.calls] == [(1, 8), (2, 8)]
    for hessian in hessians_of(_optimizer(trainer)):
        assert torch.isfinite(hessian).all() and hessian.abs().sum() > 0


def test_float_targets_without_hessian_loss_get_an_error_naming_it():
    with pytest.raises(ValueError, match="hessian_loss='gaussian' or 'bernoulli'"):
        _fit_regression(SophiaHessianCallback(), steps=1)


class LitSophiaBesideAdamW(LitLM):
    """Manual optimization with two optimizers: SophiaG on the head, AdamW on the rest."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.checked = 0

    def configure_optimizers(self):
        head = list(self.model.head.parameters())
        rest = [p for p in self.parameters() if all(p is not h for h in head)]
        sophia = SophiaG(head, lr=1e-2, rho=0.05, weight_decay=0.0, refresh_every=1)
        self.spy = RefreshSpy.attach(sophia)
        return [sophia, torch.optim.AdamW(rest, lr=1e-3)]

    def training_step(self, batch, batch_idx):
        sophia, adamw = self.optimizers()
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs).flatten(0, 1), targets.flatten())
        sophia.zero_grad()
        adamw.zero_grad()
        self.manual_backward(loss)
        params = [p for group in adamw.param_groups for p in group["params"]]
        training = [p.grad.clone() for p in params]
        sophia.step()  # refreshes h after the step: a backward of the sampled loss
        for param, grad in zip(params, training, strict=True):
            torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)
        self.checked += 1
        adamw.step()


def test_a_refresh_leaves_another_optimizers_gradients_alone():
    """The refresh's backward used to add the sampled loss's gradient to AdamW's (max
    difference 0.239): AdamW then stepped on the sum."""
    module, callback = LitSophiaBesideAdamW(), SophiaHessianCallback()
    _fit(module, [callback], max_steps=6, rows=24)
    assert callback.refreshes == module.checked == 3  # 3 batches, a refresh after each step


class LitLargeRegression(LitRegression):
    """Outputs near 3000, where bf16 has a resolution of 16."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.net[2].bias.fill_(3000.0)


def _head_bias_hessian_near_3000(precision: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 3, generator=generator)
    data = torch.utils.data.TensorDataset(inputs, inputs[:, :2].sin() + 3000)
    module = LitLargeRegression()
    trainer = pl.Trainer(callbacks=[SophiaHessianCallback(hessian_loss="gaussian")],
                         accelerator="cpu", devices=1, logger=False, precision=precision,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=64))
    return _optimizer(trainer).state[module.net[2].bias]["hessian"]


def test_gaussian_refresh_of_large_outputs_under_bf16_mixed_is_not_zero():
    """A bf16 draw ŷ = f + noise rounded to f: the mean h was 0.0000 under bf16-mixed. The
    refresh draws the same noise under both precisions, so the h must agree."""
    full, mixed = (_head_bias_hessian_near_3000(p) for p in ("32-true", "bf16-mixed"))
    assert (full > 0).all()
    torch.testing.assert_close(mixed, full, rtol=0.02, atol=0)
