"""Building optimizers: Sophia keywords, variants, the refresh each optimizer gets."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import sophia_pytorch
from sophia_pytorch.harness import registry, trainer
from sophia_pytorch.harness.cli import main
from sophia_pytorch.harness.config import PRESETS, make_config
from sophia_pytorch.harness.errors import SophiaError
from sophia_pytorch.harness.hessian import GaussNewtonBartlett, Hutchinson, NoRefresh
from sophia_pytorch.harness.model import GPT, GPTConfig
from sophia_pytorch.harness.optimizers import build_optimizer, build_refresh
from sophia_pytorch.harness.registry import OPTIMIZERS


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))


class _Recording(torch.optim.SGD):
    """Stands in for SophiaG: records the keywords it was built with."""

    seen: dict = {}

    def __init__(self, params, **kwargs):
        _Recording.seen = kwargs
        super().__init__(params, lr=kwargs["lr"])


@pytest.mark.parametrize("optimizer, refresh", [
    ("sophiag", GaussNewtonBartlett), ("sophiah", Hutchinson), ("adamw", NoRefresh),
    ("lion", NoRefresh), ("sophiag-official", GaussNewtonBartlett),
])
def test_each_optimizer_gets_its_hessian_refresh_once(optimizer, refresh):
    config = make_config("tiny", {"optimizer": optimizer})
    model = _model()
    built = build_optimizer(config, model)
    chosen = build_refresh(config, built, model, autocast=contextlib.nullcontext,
                           device=torch.device("cpu"))
    assert type(chosen) is refresh
    assert (chosen.unclipped_fraction() is None) == (refresh is NoRefresh)


def _record_sophiag(monkeypatch) -> None:
    """Make "sophiag" build a _Recording, which takes any keyword."""
    spec = dataclasses.replace(OPTIMIZERS["sophiag"], build=registry._sophia(_Recording),
                               options_class=_Recording)
    monkeypatch.setitem(OPTIMIZERS, "sophiag", spec)


def test_sophia_options_reach_the_constructor_as_keywords(monkeypatch):
    _record_sophiag(monkeypatch)
    options = {"some_future_option": True, "band": [0.1, 0.5]}
    config = make_config("tiny", {"optimizer": "sophiag", "sophia_options": options})
    build_optimizer(config, _model())
    row = PRESETS["tiny"].optimizers["sophiag"]
    assert _Recording.seen == {**options, "lr": row.lr, "betas": row.betas,
                               "weight_decay": row.weight_decay, "rho": row.rho,
                               "refresh_every": 10}


def test_an_unknown_sophia_keyword_is_a_one_line_error_naming_it_before_anything_is_built():
    # Checked against SophiaG's signature when the config is made, not by parsing TypeError.
    with pytest.raises(SophiaError, match="SophiaG takes no keyword 'no_such_keyword'") as raised:
        make_config("tiny", {"sophia_options": {"no_such_keyword": 1}})
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("options, message", [
    ({"lr": 0.1}, "'lr' is set by the harness from --lr"),
    ({"betas": [0.9, 0.9]}, "from --beta1/--beta2"),
    ({"eps": float("inf")}, "is not finite"),
    ({"band": [0.1, float("nan")]}, "is not finite"),
])
def test_sophia_options_the_harness_owns_or_non_finite_are_refused(options, message):
    with pytest.raises(SophiaError, match=message):
        make_config("tiny", {"sophia_options": options})


def test_sophia_options_for_another_optimizer_are_refused():
    with pytest.raises(SophiaError, match="apply to sophiag, sophiah, .* only, not adamw"):
        make_config("tiny", {"optimizer": "adamw", "sophia_options": {"eps": 1e-9}})


def test_sophia_option_flags_are_toml_literals_and_override_the_file(tmp_path, monkeypatch):
    toml = tmp_path / "run.toml"
    toml.write_text("[optimizer.sophia_options]\nkept = 3\nreplaced = 1\n")
    seen = {}
    _record_sophiag(monkeypatch)

    def stop_before_training(config, resume=None, overwrite=False):
        seen["options"] = config.optimizer.sophia_options
        raise SophiaError("stopped")

    monkeypatch.setattr(trainer, "train", stop_before_training)
    assert main(["train", "--config", str(toml), "--sophia-option", "replaced=[0.1, 0.5]",
                 "--sophia-option", "flag=true", "--sophia-option", 'text="a"']) == 2
    assert seen["options"] == {"kept": 3, "replaced": [0.1, 0.5], "flag": True, "text": "a"}


@pytest.mark.parametrize("item", ["noequals", "=1", "x=not toml", "x="])
def test_a_malformed_sophia_option_flag_is_one_line_exit_2(item, capsys):
    assert main(["train", "--sophia-option", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad --sophia-option") and err.count("\n") == 1


def test_the_official_variant_merges_official_defaults_under_the_presets_row(monkeypatch):
    spec = dataclasses.replace(
        OPTIMIZERS["sophiag-official"], options_class=_Recording,
        build=registry._sophia(_Recording, registry._official_defaults))
    monkeypatch.setitem(OPTIMIZERS, "sophiag-official", spec)
    monkeypatch.setattr(sophia_pytorch, "OFFICIAL_DEFAULTS",
                        {"lr": 9.0, "betas": (0.5, 0.5), "eps": 1e-9, "switch": False},
                        raising=False)
    config = make_config("tiny", {"optimizer": "sophiag-official"})
    build_optimizer(config, _model())
    row = PRESETS["tiny"].optimizers["sophiag-official"]
    assert _Recording.seen["eps"] == 1e-9 and _Recording.seen["switch"] is False
    assert (_Recording.seen["lr"], _Recording.seen["betas"]) == (row.lr, row.betas)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_official_variant_trains_with_the_authors_hyperparameters_not_sophiags(preset):
    """Its row was Sophia-G's, which overrode every official value: it trained bit for bit
    as sophiag while `sophia presets` listed the official values."""
    official = sophia_pytorch.OFFICIAL_DEFAULTS
    built = build_optimizer(make_config(preset, {"optimizer": "sophiag-official"}), _model())
    group = built.param_groups[0]
    assert group["betas"] == tuple(official["betas"]) and group["rho"] == official["rho"]
    assert group["weight_decay"] == official["weight_decay"]
    assert group["lr"] == PRESETS[preset].optimizers["sophiag"].lr
    ours = build_optimizer(make_config(preset, {"optimizer": "sophiag"}), _model())
    assert ours.param_groups[0]["betas"] != group["betas"] or \
        ours.param_groups[0]["rho"] != group["rho"]


def test_the_official_variant_builds_the_librarys_sophiag_with_its_official_keywords():
    official = getattr(sophia_pytorch, "OFFICIAL_DEFAULTS", {})
    built = build_optimizer(make_config("tiny", {"optimizer": "sophiag-official"}), _model())
    assert type(built) is sophia_pytorch.SophiaG
    harness_set = {"lr", "betas", "weight_decay", "rho", "refresh_every"}
    for key, value in official.items():
        if key not in harness_set:
            expected = tuple(value) if isinstance(value, list) else value
            assert built.param_groups[0][key] == expected, key


def test_muon_takes_the_hidden_matrices_and_adamw_everything_else():
    model = _model()
    built = build_optimizer(make_config("tiny", {"optimizer": "muon"}), model)
    muon_group, decayed, plain = built.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon_group["params"]) == [
        "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.proj.weight"]
    # The token table (also the tied output head) and positions stay with AdamW, decayed.
    assert sorted(names[id(p)] for p in decayed["params"]) == ["wpe.weight", "wte.weight"]
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0
    every = [id(p) for group in built.param_groups for p in group["params"]]
    assert sorted(every) == sorted(names)  # each parameter exactly once


def test_muon_rows_lr_scales_its_adamw_part_alike():
    rows = PRESETS["tiny"].optimizers
    built = build_optimizer(make_config("tiny", {"optimizer": "muon", "lr": 3 * rows["muon"].lr,
                                                 "min_lr": 0.0}), _model())
    muon_group, decayed, _ = built.param_groups
    assert muon_group["lr"] == 3 * rows["muon"].lr and muon_group["momentum"] == 0.95
    assert decayed["lr"] == pytest.approx(3 * rows["adamw"].lr)
    assert decayed["betas"] == rows["adamw"].betas
    assert decayed["weight_decay"] == rows["adamw"].weight_decay


def test_muon_state_dict_round_trips_and_the_schedule_drives_both_parts():
    from sophia_pytorch.harness.schedule import LRSchedule

    model = _model()
    config = make_config("tiny", {"optimizer": "muon"})
    built = build_optimizer(config, model)
    schedule = LRSchedule("cosine", min_lr_ratio=0.1, warmup_steps=2, max_steps=4,
                          decay_fraction=0.2)
    first = [group["lr"] for group in built.param_groups]
    schedule.apply(built, 0, first)
    x = torch.randint(256, (2, 8))
    model(x).logsumexp(-1).mean().backward()
    built.step()
    schedule.apply(built, 1, first)
    assert [group["lr"] for group in built.param_groups] == pytest.approx(first)  # warmed up
    schedule.apply(built, 0, first)
    assert [group["lr"] for group in built.param_groups] == pytest.approx([f / 2 for f in first])
    assert built.muon.param_groups[0]["lr"] == built.param_groups[0]["lr"]
    saved = built.state_dict()
    again = build_optimizer(config, model)
    again.load_state_dict(saved)
    assert again.param_groups[0] is again.muon.param_groups[0]  # still the live dicts
    for param in built.muon.param_groups[0]["params"]:
        assert torch.equal(built.state[param]["momentum_buffer"],
                           again.state[param]["momentum_buffer"])


def test_reading_muons_state_through_the_wrapper_changes_neither_optimizer():
    model = _model()
    built = build_optimizer(make_config("tiny", {"optimizer": "muon"}), model)
    model(torch.randint(256, (2, 8))).logsumexp(-1).mean().backward()
    built.step()
    sizes = (len(built.muon.state), len(built.adamw.state))
    assert len(built.state) == sum(sizes) == len(list(model.parameters()))
    assert all(isinstance(state, dict) for state in built.state.values())
    assert (len(built.muon.state), len(built.adamw.state)) == sizes
    built.state_dict()  # packs each optimizer's own parameters only


def test_muon_refuses_fsdp():
    with pytest.raises(SophiaError, match="muon cannot run under --parallel fsdp"):
        make_config("tiny", {"optimizer": "muon", "parallel": "fsdp"})


# ------------------------------------------------------------------ the registry
def _sgd(settings, model, rows, device):
    return torch.optim.SGD(registry.decay_groups(list(model.parameters()),
                                                 settings.weight_decay), lr=settings.lr)


def test_adding_an_optimizer_is_one_registry_row(monkeypatch, tmp_path):
    from sophia_pytorch.harness.config import optimizer_names
    from tests.harness.helpers import tiny_config

    monkeypatch.setitem(OPTIMIZERS, "sgd", registry.OptimizerSpec(
        _sgd, row="adamw", fsdp_refusal="sgd cannot run under --parallel fsdp here"))
    assert "sgd" in optimizer_names()
    config = make_config("tiny", {"optimizer": "sgd"})
    assert config.optimizer.lr == PRESETS["tiny"].optimizers["adamw"].lr  # its row's
    model = _model()
    built = build_optimizer(config, model)
    assert type(built) is torch.optim.SGD
    refresh = build_refresh(config, built, model, autocast=contextlib.nullcontext,
                            device=torch.device("cpu"))
    assert type(refresh) is NoRefresh
    with pytest.raises(SophiaError, match="sgd cannot run under --parallel fsdp here"):
        make_config("tiny", {"optimizer": "sgd", "parallel": "fsdp"})
    with pytest.raises(SophiaError, match="apply to sophiag, sophiah, .* only, not sgd"):
        make_config("tiny", {"optimizer": "sgd", "sophia_options": {"eps": 1e-9}})
    result = trainer.train(tiny_config(tmp_path, optimizer="sgd", max_steps=2))
    assert result.steps == 2


def test_every_registered_optimizer_has_its_row_in_every_preset():
    for preset in PRESETS.values():
        for name, spec in OPTIMIZERS.items():
            assert spec.row in preset.optimizers, (name, spec.row)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_builds_and_steps(name):
    model = _model()
    built = build_optimizer(make_config("tiny", {"optimizer": name}), model)
    model(torch.randint(256, (2, 8))).logsumexp(-1).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    built.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_sophia_options_are_checked_against_the_constructors_signature():
    accepted = make_config("tiny", {"sophia_options": {"bias_correction": True, "eps": 1e-12}})
    built = build_optimizer(accepted, _model())
    assert built.param_groups[0]["bias_correction"] is True
    for name in ("sophiag", "sophiah", "sophiag-official"):
        assert OPTIMIZERS[name].unknown_options({"eps": 1, "epsilon": 1}) == ["epsilon"]
    assert OPTIMIZERS["adamw"].unknown_options({"eps": 1}) == ["eps"]  # takes none


@pytest.mark.parametrize("name, rest_class", [("muon-adamw", torch.optim.AdamW),
                                              ("muon-sophiag", sophia_pytorch.SophiaG)])
def test_muon_hybrids_fix_muon_at_its_row_and_tune_the_other_part(name, rest_class):
    rows = PRESETS["tiny"].optimizers
    model = _model()
    built = build_optimizer(make_config("tiny", {"optimizer": name, "lr": 3 * rows[name].lr,
                                                 "min_lr": 0.0}), model)
    muon_group, decayed, plain = built.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon_group["lr"] == rows["muon"].lr  # not scaled by the grid
    assert muon_group["momentum"] == rows["muon"].betas[0]
    assert isinstance(built.rest, rest_class)
    assert decayed["lr"] == pytest.approx(3 * rows[name].lr)
    assert decayed["betas"] == rows[name].betas
    assert sorted(names[id(p)] for p in decayed["params"]) == ["wpe.weight", "wte.weight"]
    assert plain["weight_decay"] == 0
    every = [id(p) for group in built.param_groups for p in group["params"]]
    assert sorted(every) == sorted(names)  # each parameter exactly once


def test_muon_sophiag_refreshes_the_sophia_part_only():
    config = make_config("tiny", {"optimizer": "muon-sophiag"})
    model = _model()
    built = build_optimizer(config, model)
    refresh = build_refresh(config, built, model, autocast=contextlib.nullcontext,
                            device=torch.device("cpu"))
    assert type(refresh) is GaussNewtonBartlett and refresh.optimizer is built.rest
    x = torch.randint(256, (4, 8))
    for step in range(1, 11):  # one refresh falls due after k = 10 steps
        built.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        built.step()
        refresh([(x, x)], key=step)
    hessians = [built.rest.state[p]["hessian"] for g in built.rest.param_groups
                for p in g["params"]]
    assert all(h.abs().sum() > 0 for h in hessians)
    assert all("hessian" not in built.muon.state[p] for p in built.muon.param_groups[0]["params"])
    assert refresh.unclipped_fraction() is not None
    again = build_optimizer(config, model)
    again.load_state_dict(built.state_dict())
    for group in built.rest.param_groups:
        for p in group["params"]:
            assert torch.equal(again.state[p]["hessian"], built.state[p]["hessian"])


def test_sophia_presets_lists_every_optimizer_with_its_description(capsys):
    assert main(["presets"]) == 0
    shown = capsys.readouterr().out
    for name, spec in OPTIMIZERS.items():
        assert spec.description and f"{name} " in shown and spec.description in shown


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiah", "sophiag-official",
                                       "muon-sophiag"])
def test_state_dtype_bfloat16_reaches_sophia_and_float32_keeps_the_default(optimizer):
    for state_dtype, expected in (("bfloat16", torch.bfloat16), ("float32", None)):
        config = make_config("tiny", {"optimizer": optimizer, "state_dtype": state_dtype})
        built = build_optimizer(config, _model())
        sophia = built.rest if optimizer == "muon-sophiag" else built
        assert sophia.state_dtype == expected


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiag-official", "muon-sophiag"])
def test_state_dtype_uint8_reaches_sophiag(optimizer):
    config = make_config("tiny", {"optimizer": optimizer, "state_dtype": "uint8"})
    built = build_optimizer(config, _model())
    sophia = built.rest if optimizer == "muon-sophiag" else built
    assert sophia.state_dtype == torch.uint8


def test_state_dtype_uint8_for_sophiah_is_refused_with_the_fix():
    with pytest.raises(SophiaError, match="uint8 does not apply to sophiah.*bfloat16"):
        make_config("tiny", {"optimizer": "sophiah", "state_dtype": "uint8"})


def test_state_dtype_for_another_optimizer_is_refused():
    with pytest.raises(SophiaError, match="--state-dtype bfloat16 applies to .* not adamw"):
        make_config("tiny", {"optimizer": "adamw", "state_dtype": "bfloat16"})
    with pytest.raises(SophiaError, match="state_dtype must be one of|state_dtype"):
        make_config("tiny", {"state_dtype": "float16"})
    with pytest.raises(SophiaError, match="set by the harness from --state-dtype"):
        make_config("tiny", {"sophia_options": {"state_dtype": "bfloat16"}})


def _checkpoint_state_dtypes(folder: str) -> set[torch.dtype]:
    saved = torch.load(f"{folder}/checkpoint.pt", weights_only=False)
    states = saved["optimizer"]["state"].values()
    return {s[k].dtype for s in states for k in ("exp_avg", "hessian")}


def test_a_float32_state_run_resumes_with_bf16_state_and_back(tmp_path):
    """--state-dtype is no fixed setting: a resume converts the loaded state (float32 -> bf16
    to nearest, bf16 -> float32 exactly) and trains on."""
    from tests.harness.helpers import tiny_config

    config = tiny_config(tmp_path, max_steps=2)
    trainer.train(config)
    assert _checkpoint_state_dtypes(config.run.out_dir) == {torch.float32}
    for steps, state_dtype, expected in (("4", "bfloat16", torch.bfloat16),
                                         ("6", "float32", torch.float32)):
        assert main(["train", "--resume", config.run.out_dir, "--max-steps", steps,
                     "--state-dtype", state_dtype, "--no-progress"]) == 0
        assert _checkpoint_state_dtypes(config.run.out_dir) == {expected}
