"""SophiaG/SophiaH as torch.optim optimizers: defaults, state, groups, schedulers, closures,
maximize, validation, diagnostics, checkpoints, attention models and torch.compile."""

from __future__ import annotations

import copy
import io
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sophia_pytorch
from tests.optim.reference import (
    ReferenceParam,
    as_numpy,
    reference_refresh,
    reference_step,
    torch_on_one_thread,  # noqa: F401  (autouse fixture)
)

OPTIMIZERS = {"SophiaG": sophia_pytorch.SophiaG, "SophiaH": sophia_pytorch.SophiaH}


# --------------------------------------------------------------------------- defaults, state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_defaults_are_those_of_the_contract_and_the_official_code(name):
    defaults = OPTIMIZERS[name]([torch.zeros(1, requires_grad=True)]).defaults
    assert defaults["lr"] == 1e-4 and defaults["betas"] == (0.965, 0.99)
    assert defaults["rho"] == 0.04 and defaults["weight_decay"] == 0.1
    assert defaults["eps"] == 1e-15 and defaults["maximize"] is False
    official = pytest.importorskip("sophia_opt").SophiaG([torch.zeros(1, requires_grad=True)])
    for key in ("lr", "betas", "rho", "weight_decay"):
        assert defaults[key] == official.defaults[key]


@pytest.mark.parametrize(
    ("dtype", "state_dtype"),
    [(torch.float64, torch.float64), (torch.float32, torch.float32),
     (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
    ids=["float64", "float32", "bfloat16", "float16"],
)
def test_state_holds_exp_avg_hessian_and_step_and_refresh_counters(dtype, state_dtype):
    param = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param])
    assert param not in optimizer.state
    param.grad = torch.ones_like(param)
    optimizer.step()
    optimizer.step()
    optimizer.update_hessian(scale=4)
    state = optimizer.state[param]
    assert set(state) == {"exp_avg", "hessian", "step", "hessian_step", "last_refresh_step"}
    assert torch.is_tensor(state["step"]) and float(state["step"]) == 2
    assert state["hessian_step"].dtype == torch.float32 and float(state["hessian_step"]) == 1
    assert float(state["last_refresh_step"]) == 2 and optimizer.last_refresh_step() == 2
    for key in ("exp_avg", "hessian"):
        assert state[key].dtype == state_dtype and state[key].shape == param.shape
    assert optimizer.steps_taken() == 2 and optimizer.refreshes_done() == 1


def test_sparse_gradients_are_refused():
    param = torch.zeros(4, requires_grad=True)
    param.grad = torch.sparse_coo_tensor([[1]], [1.0], (4,))
    with pytest.raises(RuntimeError, match="sparse"):
        sophia_pytorch.SophiaG([param]).step()


def test_a_sparse_gradient_in_update_hessian_is_refused_as_step_refuses_it():
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    embedding(torch.tensor([1, 3])).sum().backward()
    optimizer = sophia_pytorch.SophiaG(embedding.parameters())
    with pytest.raises(RuntimeError, match="SophiaG does not support sparse gradients"):
        optimizer.update_hessian(scale=2)
    assert not optimizer.state


def test_complex_parameter_moves_as_its_real_and_imaginary_parts():
    """A complex parameter is optimised as the real pairs of ``torch.view_as_real``."""
    generator = torch.Generator().manual_seed(31)
    initial = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    real = initial.clone().requires_grad_()
    complex_param = torch.view_as_complex(initial.clone()).requires_grad_()
    optimizers = [sophia_pytorch.SophiaG([p], lr=0.1, rho=0.5) for p in (real, complex_param)]
    for t in range(6):
        grad = torch.randn(4, 2, generator=generator, dtype=torch.float64)
        real.grad, complex_param.grad = grad.clone(), torch.view_as_complex(grad.clone())
        if t % 3 == 1:
            for optimizer in optimizers:
                optimizer.update_hessian(scale=2.0)
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(torch.view_as_real(complex_param.detach()), real.detach(),
                               rtol=1e-14, atol=0)


# ---------------------------------------------------------------- groups, schedulers, lr


def test_each_group_steps_with_its_own_hyperparameters():
    """First step (h = 0, so a sign step): θ·(1 − lr·wd) − lr·sign(g) with each group's lr, wd."""
    a = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([2.0, 0.5], dtype=torch.float64, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([{"params": [a], "lr": 0.1, "weight_decay": 0.5},
                                {"params": [b]}], lr=0.01, weight_decay=0.0)
    a.grad = torch.tensor([0.3, 0.2], dtype=torch.float64)
    b.grad = torch.tensor([-0.3, 0.2], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(a.detach(), torch.tensor([0.95 - 0.1, -0.95 - 0.1],
                                                        dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.tensor([2.01, 0.49], dtype=torch.float64))


def _sign_steps_under(make_scheduler, lr: float, steps: int) -> tuple[torch.Tensor, list[float]]:
    """Constant gradient, no refresh (h = 0), no decay: every step is −lr_t·sign(g)."""
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([theta], lr=lr, weight_decay=0.0)
    scheduler = make_scheduler(optimizer)
    used = []
    for _ in range(steps):
        theta.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return theta.detach(), used


@pytest.mark.parametrize("kind", ["StepLR", "LambdaLR"])
def test_lr_scheduler_sets_the_step_size(kind):
    if kind == "StepLR":
        make = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        expected_lrs = [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    else:
        make = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (t + 1))
        expected_lrs = [0.1 / (t + 1) for t in range(6)]
    theta, used = _sign_steps_under(make, 0.1, 6)
    np.testing.assert_allclose(used, expected_lrs, rtol=1e-15)
    displacement = math.fsum(expected_lrs)
    torch.testing.assert_close(
        theta, -displacement * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64),
        rtol=1e-14, atol=0)


def test_tensor_lr_updated_in_place_by_a_scheduler_is_used():
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.25, dtype=torch.float64)
    optimizer = sophia_pytorch.SophiaG([theta], lr=lr, weight_decay=0.0)
    theta.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    optimizer.step()
    optimizer.param_groups[0]["lr"].fill_(0.5)
    optimizer.step()
    torch.testing.assert_close(theta.detach(), torch.tensor([-0.75, 0.75], dtype=torch.float64))


# ------------------------------------------------------------------------ closure, maximize


def test_step_with_closure_returns_its_loss_and_uses_its_gradient():
    theta = torch.tensor([1.0, -3.0], dtype=torch.float64, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([theta], lr=0.1, weight_decay=0.0)

    def closure():
        optimizer.zero_grad()
        loss = (theta - torch.tensor([2.0, -5.0], dtype=torch.float64)).pow(2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() == 1.0 + 4.0
    torch.testing.assert_close(theta.detach(), torch.tensor([1.1, -3.1], dtype=torch.float64))


def _tiny_classifier(seed: int, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 4)).to(dtype)


def _batch(step: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(16, 6, generator=generator).to(dtype),
            torch.randint(0, 4, (16,), generator=generator))


def test_maximize_equals_minimizing_the_negated_loss():
    models = [_tiny_classifier(2), _tiny_classifier(2)]
    optimizers = [sophia_pytorch.SophiaG(models[0].parameters(), lr=1e-2, maximize=True),
                  sophia_pytorch.SophiaG(models[1].parameters(), lr=1e-2)]
    for t in range(12):
        inputs, targets = _batch(t)
        for model, optimizer, sign in zip(models, optimizers, (1.0, -1.0), strict=True):
            if t % 4 == 1:
                optimizer.zero_grad()
                loss, n = sophia_pytorch.sampled_cross_entropy(
                    model(inputs), generator=torch.Generator().manual_seed(t))
                loss.backward()
                optimizer.update_hessian(scale=n)
            optimizer.zero_grad()
            (sign * -F.cross_entropy(model(inputs), targets)).backward()
            optimizer.step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------ validation


BAD_HYPERPARAMETERS = [
    ("lr", -1e-3, "-0.001"), ("lr", "fast", "'fast'"), ("lr", float("nan"), "nan"),
    ("lr", torch.tensor([1e-3, 2e-3]), "Tensor lr must be 1-element"),
    ("rho", -0.04, "-0.04"), ("eps", -1e-15, "-1e-15"), ("weight_decay", -0.1, "-0.1"),
    ("betas", (1.0, 0.99), "1.0"), ("betas", (0.9, 1.0), "1.0"), ("betas", (-0.1, 0.99), "-0.1"),
    ("betas", (0.9,), r"\(0.9,\)"), ("betas", "0.9", "'0.9'"), ("rho", None, "None"),
    ("refresh_every", 0, "0"), ("refresh_every", 2.5, "2.5"),
]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize(("key", "value", "shown"), BAD_HYPERPARAMETERS,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_HYPERPARAMETERS])
def test_invalid_hyperparameter_raises_value_error_naming_it(name, key, value, shown):
    with pytest.raises(ValueError, match=shown):
        OPTIMIZERS[name]([torch.zeros(2, requires_grad=True)], **{key: value})


GROUP_BAD = [("lr", -1.0, "-1.0"), ("rho", -2.0, "-2.0"), ("eps", -3.0, "-3.0"),
             ("weight_decay", -4.0, "-4.0"), ("betas", (1.5, 0.9), "1.5")]


@pytest.mark.parametrize(("key", "value", "shown"), GROUP_BAD, ids=[k for k, _, _ in GROUP_BAD])
def test_invalid_group_hyperparameter_raises_value_error_naming_it(key, value, shown):
    """The checks apply to a parameter group's own hyperparameters too, in the constructor and
    in ``add_param_group``."""
    with pytest.raises(ValueError, match=shown):
        sophia_pytorch.SophiaG([{"params": [torch.zeros(2, requires_grad=True)], key: value}])
    optimizer = sophia_pytorch.SophiaG([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=shown):
        optimizer.add_param_group({"params": [torch.zeros(3, requires_grad=True)], key: value})


# ----------------------------------------------------------------------------- diagnostics


def test_hessian_due_after_every_refresh_every_steps():
    theta = torch.zeros(2, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([theta], refresh_every=10)
    assert not optimizer.hessian_due() and optimizer.steps_taken() == 0
    due = []
    for step in range(1, 26):
        theta.grad = torch.ones(2)
        optimizer.step()
        assert optimizer.steps_taken() == step
        if optimizer.hessian_due():
            due.append(step)
            optimizer.update_hessian(scale=1)
            assert not optimizer.hessian_due()
    assert due == [10, 20]


def test_a_refresh_not_done_stays_due_until_it_is():
    theta = torch.zeros(2, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([theta], refresh_every=4)
    due = []
    for step in range(1, 12):
        theta.grad = torch.ones(2)
        optimizer.step()
        if optimizer.hessian_due():
            due.append(step)
            if step == 6:  # owed since step 4; the next is due 4 steps after this one
                optimizer.update_hessian(scale=1)
    assert due == [4, 5, 6, 10, 11]


def test_unclipped_fraction_on_the_meta_device_is_nan_and_leaves_rho_alone():
    """Meta tensors hold no values: there is no fraction to count (NaN, not an error, so a
    logging loop of a meta-device dry run goes on), and an ``unclipped_band`` keeps ρ."""
    param = torch.zeros(4, device="meta", requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], unclipped_band=(0.1, 0.5), foreach=False)
    assert optimizer.unclipped_fraction() == 0.0  # no state yet
    param.grad = torch.ones(4, device="meta")
    optimizer.step()
    assert optimizer.update_hessian(scale=2) is True
    assert math.isnan(optimizer.unclipped_fraction())
    assert optimizer.param_groups[0]["rho"] == 0.04


def test_unclipped_fraction_counts_coordinates_the_clip_leaves_alone():
    """Against a count made on the float64 reference's m and h: |m / max(ρh, ε)| < 1."""
    generator = torch.Generator().manual_seed(32)
    params = [torch.randn(s, generator=generator, dtype=torch.float64, requires_grad=True)
              for s in [(20, 10), (30,)]]
    hyper = dict(lr=0.01, betas=(0.9, 0.9), rho=0.05, weight_decay=0.0, eps=1e-15)
    optimizer = sophia_pytorch.SophiaG(params, **hyper)
    assert optimizer.unclipped_fraction() == 0.0
    references = [ReferenceParam(as_numpy(p)) for p in params]
    for t in range(8):
        for p, ref in zip(params, references, strict=True):
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if t % 3 == 0:
                reference_refresh(ref, 4.0 * as_numpy(p.grad) ** 2, beta2=0.9)
        if t % 3 == 0:
            optimizer.update_hessian(scale=4.0)
        for p, ref in zip(params, references, strict=True):
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            reference_step(ref, as_numpy(p.grad), lr=0.01, beta1=0.9, rho=0.05,
                           weight_decay=0.0, eps=1e-15)
        optimizer.step()
    ratios = np.concatenate([
        np.abs(ref.exp_avg / np.maximum(0.05 * ref.hessian, 1e-15)).ravel() for ref in references
    ])
    assert not np.any(np.abs(ratios - 1) < 1e-9), "no coordinate on the boundary"
    expected = float(np.mean(ratios < 1))
    assert 0.05 < expected < 0.95
    assert optimizer.unclipped_fraction() == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- checkpoints


def _train_steps(model, optimizer, steps, *, hutchinson: bool, dtype) -> None:
    for t in steps:
        inputs, targets = _batch(t, dtype)
        if t % 4 == 3:
            if hutchinson:
                optimizer.update_hessian(
                    lambda x=inputs, y=targets: F.cross_entropy(model(x), y),
                    generator=torch.Generator().manual_seed(t))
            else:
                optimizer.zero_grad()
                loss, n = sophia_pytorch.sampled_cross_entropy(
                    model(inputs), generator=torch.Generator().manual_seed(t))
                loss.backward()
                optimizer.update_hessian(scale=n)
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_resumes_the_same_trajectory(name, dtype):
    """Checkpoint after 10 steps (two refreshes), load into a fresh model and optimizer, run 10
    more: bitwise the uninterrupted run. For bf16 parameters the loaded m and h stay float32."""
    make = lambda model: OPTIMIZERS[name](model.parameters(), lr=1e-2, weight_decay=0.1)
    hutchinson = name == "SophiaH"
    model = _tiny_classifier(3, dtype)
    optimizer = make(model)
    _train_steps(model, optimizer, range(10), hutchinson=hutchinson, dtype=dtype)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    saved_state = copy.deepcopy(optimizer.state_dict()["state"])
    _train_steps(model, optimizer, range(10, 20), hutchinson=hutchinson, dtype=dtype)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = _tiny_classifier(99, dtype)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(checkpoint["optimizer"])
    for index, p in enumerate(resumed_model.parameters()):
        state = resumed.state[p]
        for key in ("exp_avg", "hessian"):
            assert state[key].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
            assert torch.equal(state[key], saved_state[index][key])
        assert float(state["step"]) == 10
    assert any(bool(resumed.state[p]["hessian"].any()) for p in resumed_model.parameters())
    _train_steps(resumed_model, resumed, range(10, 20), hutchinson=hutchinson, dtype=dtype)

    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "hessian", "step"):
            assert torch.equal(optimizer.state[p][key], resumed.state[q][key])


# ----------------------------------------------------------------- attention and compile


class _Attention(torch.nn.Module):
    """One self-attention layer scored by a linear head; ``fused`` picks SDPA or the formula."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor, *, sdpa: bool) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        if sdpa:
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            mixed = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.head(mixed.squeeze(1))


def _attention_problem(dtype):
    generator = torch.Generator().manual_seed(33)
    x = torch.randn(2, 5, 8, generator=generator, dtype=dtype)
    targets = torch.randint(0, 3, (2, 5), generator=generator)
    torch.manual_seed(34)
    return _Attention().to(dtype), x, targets


def test_sophiah_refresh_through_sdpa_equals_the_attention_formula():
    """With the default ``math_attention=True`` the refresh works on a model that calls
    F.scaled_dot_product_attention, and gives the estimate of the same model written out."""
    model, x, targets = _attention_problem(torch.float64)
    estimates = []
    for sdpa in (True, False):
        optimizer = sophia_pytorch.SophiaH(model.parameters(), betas=(0.9, 0.0))
        assert optimizer.update_hessian(
            lambda s=sdpa: F.cross_entropy(model(x, sdpa=s).reshape(-1, 3), targets.reshape(-1)),
            generator=torch.Generator().manual_seed(35))
        estimates.append([optimizer.state[p]["hessian"].clone() for p in model.parameters()])
    for with_sdpa, written_out in zip(*estimates, strict=True):
        torch.testing.assert_close(with_sdpa, written_out, rtol=1e-10, atol=1e-12)
    assert any(bool(e.abs().gt(0).any()) for e in estimates[0])


def test_sophiah_refresh_through_fused_attention_works_or_says_what_to_do():
    """``math_attention=False`` leaves the SDPA backend to torch; where that kernel has no double
    backward the error must point at the fix (math attention)."""
    model, x, targets = _attention_problem(torch.float32)
    optimizer = sophia_pytorch.SophiaH(model.parameters())
    closure = lambda: F.cross_entropy(model(x, sdpa=True).reshape(-1, 3), targets.reshape(-1))
    try:
        folded = optimizer.update_hessian(closure, math_attention=False)
    except RuntimeError as error:
        assert "math_attention=True" in str(error) or "SDPBackend.MATH" in str(error)
    else:
        assert folded is True
        assert all(torch.isfinite(optimizer.state[p]["hessian"]).all()
                   for p in model.parameters())


def _has_cxx_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cxx_compiler(),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compiled_step_matches_eager_step():
    """torch.compile(optimizer.step) on a linear classifier, 4 steps with a GNB refresh before the
    second: the same parameters as eager to float32 rounding (inductor may fuse and reorder)."""
    models = []
    for _ in range(2):
        torch.manual_seed(4)
        models.append(torch.nn.Linear(6, 4))
    optimizers = [sophia_pytorch.SophiaG(m.parameters(), lr=1e-2) for m in models]
    steps = [optimizers[0].step, torch.compile(optimizers[1].step)]
    for t in range(4):
        inputs, targets = _batch(t)
        for model, optimizer, step in zip(models, optimizers, steps, strict=True):
            if t == 1:
                optimizer.zero_grad()
                loss, n = sophia_pytorch.sampled_cross_entropy(
                    model(inputs), generator=torch.Generator().manual_seed(t))
                loss.backward()
                optimizer.update_hessian(scale=n)
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert float(optimizers[1].state[q]["step"]) == 4
        torch.testing.assert_close(optimizers[0].state[p]["hessian"],
                                   optimizers[1].state[q]["hessian"])


def test_loading_another_optimizers_state_is_refused_naming_the_missing_keys():
    param = torch.ones(3, requires_grad=True)
    adamw = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    adamw.step()
    optimizer = sophia_pytorch.SophiaG([param])
    with pytest.raises(ValueError, match=r"lacks \['hessian'\].*exp_avg_sq"):
        optimizer.load_state_dict(adamw.state_dict())
    assert not optimizer.state  # nothing was loaded
    param.grad = torch.ones(3)
    optimizer.step()  # and the optimizer still works


def test_a_state_saved_before_the_refresh_counters_existed_still_loads():
    param = torch.ones(3, requires_grad=True)
    optimizer = sophia_pytorch.SophiaG([param], refresh_every=2)
    param.grad = torch.ones(3)
    optimizer.step()
    saved = optimizer.state_dict()
    for state in saved["state"].values():
        del state["hessian_step"], state["last_refresh_step"]
    loaded = sophia_pytorch.SophiaG([param], refresh_every=2)
    loaded.load_state_dict(saved)
    loaded.step()
    assert loaded.hessian_due() and loaded.update_hessian(scale=1)
    assert loaded.refreshes_done() == 1 and loaded.last_refresh_step() == 2


STATE_DTYPE_CASES = [(torch.float32, torch.float64), (torch.float64, torch.float32),
                     (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize(("saved", "loaded"), STATE_DTYPE_CASES,
                         ids=[f"{str(s)[6:]}-to-{str(t)[6:]}" for s, t in STATE_DTYPE_CASES])
def test_loaded_state_takes_the_dtype_rule_of_the_parameter(saved, loaded):
    """After load_state_dict, m and h have the dtype a fresh state would have for the *loaded*
    parameter (its own dtype, float32 for bf16/fp16), whatever the checkpoint's model used."""
    source = torch.nn.Linear(3, 2).to(saved)
    optimizer = sophia_pytorch.SophiaG(source.parameters())
    for p in source.parameters():
        p.grad = torch.ones_like(p)
    optimizer.update_hessian(scale=3.0)
    optimizer.step()
    target = torch.nn.Linear(3, 2).to(loaded)
    resumed = sophia_pytorch.SophiaG(target.parameters())
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    expected = torch.float32 if loaded in (torch.bfloat16, torch.float16) else loaded
    for p, q in zip(source.parameters(), target.parameters(), strict=True):
        for key in ("exp_avg", "hessian"):
            assert resumed.state[q][key].dtype == expected
            torch.testing.assert_close(resumed.state[q][key],
                                       optimizer.state[p][key].to(expected))
