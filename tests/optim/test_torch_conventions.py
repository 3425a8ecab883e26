"""SophiaG and SophiaH described as torch describes its optimizers, and put through the kinds of
generic checks torch's own optimizer tests (``TestOptimRenewed``) run on every entry of
``torch.testing._internal.common_optimizers.optim_db``.

The descriptions are torch's ``OptimizerInfo`` / ``OptimizerInput`` / ``ErrorOptimizerInput``,
and the configurations are expanded over the implementation flags (foreach, fused) by torch's
own ``_get_optim_inputs_including_global_cliquey_kwargs``. torch's test module itself is not
shipped in the wheel, so the checks are ours: each is written from what torch checks, with
references computed independently of the optimizer under test (a negated loss, a real view of a
complex parameter, a fresh optimizer over cloned parameters, the for-loop path).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import sophia_pytorch
from sophia_pytorch.functional import fused_kernel_available
from tests.optim.reference import torch_on_one_thread  # noqa: F401  (autouse fixture)

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")
common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
OptimizerInfo = common_optimizers.OptimizerInfo
OptimizerInput = common_optimizers.OptimizerInput
ErrorOptimizerInput = common_optimizers.ErrorOptimizerInput
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum
all_configs = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs

pytestmark = pytest.mark.slow  # importing torch.testing._internal takes ~10 s of CPU


def optim_inputs_func_sophia(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs=dict(lr=0.01), desc="non-default lr"),
        OptimizerInput(params=None, kwargs=dict(weight_decay=0.0), desc="no weight decay"),
        OptimizerInput(params=None, kwargs=dict(maximize=True), desc="maximize"),
        OptimizerInput(params=None, kwargs=dict(rho=1.0, betas=(0.9, 0.95)),
                       desc="non-default rho and betas"),
        OptimizerInput(params=None, kwargs=dict(bias_correction=True, refresh_at_start=True,
                                                refresh_every=2), desc="refresh options"),
        OptimizerInput(params=None, kwargs=dict(unclipped_band=(0.1, 0.5)), desc="rho band"),
    ]


def optim_error_inputs_func_sophia(device, dtype):
    def params():
        return [torch.nn.Parameter(torch.randn(2, device=device, dtype=dtype))]

    construction = [
        (dict(lr=-1e-2), ValueError, "Invalid learning rate"),
        (dict(lr=torch.tensor([1e-3, 2e-3])), ValueError, "Tensor lr must be 1-element"),
        (dict(betas=(1.0, 0.99)), ValueError, "beta1"),
        (dict(betas=(0.9, -0.1)), ValueError, "beta2"),
        (dict(rho=-0.1), ValueError, "rho"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(refresh_every=0), ValueError, "refresh_every"),
        (dict(fused=True, foreach=True), ValueError, "fused=True and foreach=True"),
    ]
    inputs = [ErrorOptimizerInput(OptimizerInput(params=params(), kwargs=kwargs),
                                  error_type=error, error_regex=regex)
              for kwargs, error, regex in construction]
    inputs += [
        ErrorOptimizerInput(
            OptimizerInput(params=[torch.zeros(3, device="meta")], kwargs=dict(fused=True)),
            error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError,
            error_regex="`fused=True` requires all the params to be floating point Tensors"),
        ErrorOptimizerInput(
            OptimizerInput(params=params(), kwargs={}, desc="sparse gradient"),
            error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError,
            error_regex="does not support sparse gradients"),
    ]
    return inputs


OPTIM_DB = [
    OptimizerInfo(
        optim_cls,
        optim_inputs_func=optim_inputs_func_sophia,
        optim_error_inputs_func=optim_error_inputs_func_sophia,
        supported_impls=("foreach", "fused"),
        supports_fused_on=("cpu",),
        supports_complex=True,
        supports_sparse=False,
        step_requires_closure=False,
    )
    for optim_cls in (sophia_pytorch.SophiaG, sophia_pytorch.SophiaH)
]
INFO_IDS = [info.name for info in OPTIM_DB]


def _configs(info, dtype=torch.float64):
    configs = all_configs("cpu", dtype, info)
    if not fused_kernel_available():
        configs = [c for c in configs if not c.kwargs.get("fused")]
    return configs


def _problem(dtype=torch.float64, seed=0):
    """torch's test problem: a linear layer and the squared norm of its output."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(10, 5, generator=generator, dtype=dtype))
    bias = torch.nn.Parameter(torch.randn(10, generator=generator, dtype=dtype))
    inputs = torch.randn(5, generator=generator, dtype=dtype)
    return weight, bias, lambda: (weight.mv(inputs) + bias).pow(2).sum()


def _refresh(optimizer, params, loss_fn, seed):
    """One Hessian refresh with the optimizer's own estimator."""
    if isinstance(optimizer, sophia_pytorch.SophiaH):
        optimizer.update_hessian(loss_fn, generator=torch.Generator().manual_seed(seed))
        return
    for param in params:
        param.grad = None
    loss_fn().backward()
    optimizer.update_hessian(scale=1.0)


def _train(optimizer, params, loss_fn, steps, *, start=0):
    for t in range(start, start + steps):
        if optimizer.hessian_due():
            _refresh(optimizer, params, loss_fn, seed=t)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        optimizer.step(closure)


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_errors(info):
    for error_input in info.optim_error_inputs_func("cpu", torch.float32):
        optim_input = error_input.optimizer_error_input
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(optim_input.params, **optim_input.kwargs)
            continue
        optimizer = info.optim_cls(optim_input.params, **optim_input.kwargs)
        for param in optim_input.params:
            param.grad = (torch.sparse_coo_tensor([[0]], [1.0], param.shape)
                          if optim_input.desc == "sparse gradient" else torch.ones_like(param))
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            optimizer.step()


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_forloop_goes_right_direction(info):
    for config in _configs(info):
        weight, bias, loss_fn = _problem()
        optimizer = info.optim_cls([weight, bias], **config.kwargs)
        initial = loss_fn().item()
        _train(optimizer, [weight, bias], loss_fn, 12)
        final = loss_fn().item()
        if config.kwargs.get("maximize"):
            assert final > initial, config
        else:
            assert final < initial, config


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_foreach_and_fused_match_the_forloop(info):
    configs = _configs(info)
    for config in configs:
        kwargs = dict(config.kwargs)
        if not (kwargs.get("foreach") or kwargs.get("fused")):
            continue
        results = []
        for impl in (kwargs, {**kwargs, "foreach": False, "fused": False}):
            weight, bias, loss_fn = _problem()
            optimizer = info.optim_cls([weight, bias], **impl)
            _train(optimizer, [weight, bias], loss_fn, 8)
            results.append((weight.detach(), bias.detach(), optimizer.param_groups[0]["rho"]))
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, msg=config.desc)


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_state_dict_round_trip_continues_the_same_trajectory(info):
    for config in _configs(info):
        weight, bias, loss_fn = _problem()
        optimizer = info.optim_cls([weight, bias], **config.kwargs)
        _train(optimizer, [weight, bias], loss_fn, 5)
        saved = copy.deepcopy(optimizer.state_dict())
        state_before = copy.deepcopy(saved)

        weight2 = torch.nn.Parameter(weight.detach().clone())
        bias2 = torch.nn.Parameter(bias.detach().clone())
        copy_fn = _same_loss_for(weight2, bias2)
        loaded = info.optim_cls([weight2, bias2], **config.kwargs)
        loaded.load_state_dict(saved)
        _same_state_dict(saved, state_before)  # loading does not mutate what was loaded

        _train(optimizer, [weight, bias], loss_fn, 5, start=5)
        _train(loaded, [weight2, bias2], copy_fn, 5, start=5)
        torch.testing.assert_close(weight2, weight, rtol=0, atol=0, msg=config.desc)
        torch.testing.assert_close(bias2, bias, rtol=0, atol=0, msg=config.desc)


def _same_loss_for(weight, bias):
    """``_problem()``'s loss (same inputs) on other parameters."""
    generator = torch.Generator().manual_seed(0)
    torch.randn(10, 5, generator=generator, dtype=torch.float64)
    torch.randn(10, generator=generator, dtype=torch.float64)
    inputs = torch.randn(5, generator=generator, dtype=torch.float64)
    return lambda: (weight.mv(inputs) + bias).pow(2).sum()


def _same_state_dict(got, want):
    assert got["param_groups"] == want["param_groups"]
    for key, state in want["state"].items():
        for name, value in state.items():
            assert torch.equal(got["state"][key][name], value)


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_param_groups_take_their_own_lr_and_weight_decay(info):
    weight, bias, loss_fn = _problem()
    bias_before = bias.detach().clone()
    optimizer = info.optim_cls([{"params": [weight]},
                                {"params": [bias], "lr": 0.0, "weight_decay": 0.0}], lr=0.01)
    weight_before = weight.detach().clone()
    _train(optimizer, [weight, bias], loss_fn, 3)
    assert torch.equal(bias, bias_before)
    assert not torch.equal(weight, weight_before)


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_a_complex_parameter_moves_as_its_real_view(info):
    if info.optim_cls is sophia_pytorch.SophiaH:
        pytest.skip("Hutchinson probes of a complex parameter are drawn complex: not a real "
                    "view's; the step itself is SophiaG's")
    for config in _configs(info):
        generator = torch.Generator().manual_seed(1)
        initial = torch.randn(3, 2, generator=generator, dtype=torch.float64)
        target = torch.randn(3, 2, generator=generator, dtype=torch.float64)
        real = torch.nn.Parameter(initial.clone())
        complex_ = torch.nn.Parameter(torch.view_as_complex(initial.clone()))
        losses = [lambda p=real, t=target: (p - t).pow(2).sum(),
                  lambda p=complex_, t=target: (torch.view_as_real(p) - t).pow(2).sum()]
        for param, loss_fn in zip((real, complex_), losses, strict=True):
            _train(info.optim_cls([param], **config.kwargs), [param], loss_fn, 6)
        torch.testing.assert_close(torch.view_as_real(complex_), real, msg=config.desc)


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_maximize_equals_minimizing_the_negated_loss(info):
    results = []
    for maximize in (True, False):
        weight, bias, loss_fn = _problem()
        objective = loss_fn if maximize else (lambda f=loss_fn: -f())
        optimizer = info.optim_cls([weight, bias], maximize=maximize, lr=0.01, foreach=False)
        _train_maximize(optimizer, [weight, bias], objective, loss_fn, 6)
        results.append((weight.detach(), bias.detach()))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _train_maximize(optimizer, params, objective, curvature_loss, steps):
    """As _train, with the Hessian refreshed on the same (positive) loss in both runs."""
    optimizer.param_groups[0]["refresh_every"] = 2
    for t in range(steps):
        if optimizer.hessian_due():
            _refresh(optimizer, params, curvature_loss, seed=t)
        optimizer.zero_grad()
        objective().backward()
        optimizer.step()


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_step_is_a_noop_without_gradients_and_for_zero_gradients_without_decay(info):
    weight, bias, _ = _problem()
    before = [weight.detach().clone(), bias.detach().clone()]
    optimizer = info.optim_cls([weight, bias], weight_decay=0.0)
    optimizer.step()  # no .grad at all
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    optimizer.step()
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_a_state_dict_without_the_newer_flags_loads(info):
    weight, bias, loss_fn = _problem()
    optimizer = info.optim_cls([weight, bias])
    _train(optimizer, [weight, bias], loss_fn, 2)
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        for flag in ("foreach", "fused", "maximize", "bias_correction", "refresh_at_start",
                     "unclipped_band", "eps", "refresh_every"):
            del group[flag]
    loaded = info.optim_cls([weight, bias])
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["maximize"] is False
    _train(loaded, [weight, bias], loss_fn, 2)


@pytest.mark.parametrize("info", OPTIM_DB, ids=INFO_IDS)
def test_the_optimizer_prints_pickles_and_deep_copies(info):
    weight, bias, loss_fn = _problem()
    optimizer = info.optim_cls([weight, bias])
    _train(optimizer, [weight, bias], loss_fn, 2)
    assert info.name in repr(optimizer) and "rho" in repr(optimizer)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer)["param_groups"] == optimizer.state_dict()["param_groups"]
    pickle.loads(pickle.dumps(optimizer))
    copy.deepcopy(optimizer)
