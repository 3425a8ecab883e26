"""Settings: sections, flat names, TOML, presets' rows, what a resumed run must keep."""

from __future__ import annotations

import dataclasses

import pytest

from sophia_pytorch.harness.cli import main
from sophia_pytorch.harness.compare.runner import _run_config, compare
from sophia_pytorch.harness.config import (
    FLAT,
    PRESETS,
    ROW_FIELDS,
    SECTIONS,
    field_doc,
    fixed_on_resume,
    flat_name,
    flatten,
    load_toml,
    make_config,
    to_dict,
)
from sophia_pytorch.harness.errors import SophiaError


def test_every_setting_has_one_flat_name_across_the_sections():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(FLAT) == len(names)  # no two sections share a flat name
    assert FLAT["data"] == ("data", "source") and FLAT["optimizer"] == ("optimizer", "name")
    assert FLAT["refresh_every"] == ("optimizer", "refresh_every")


def test_toml_sections_and_flat_keys_give_the_same_config(tmp_path):
    sections = tmp_path / "sections.toml"
    sections.write_text('[model]\nn_layer = 2\n[data]\nsource = "bible"\n'
                        '[optimizer]\nname = "adamw"\nrefresh_every = 3\n[run]\nseed = 7\n')
    flat = tmp_path / "flat.toml"
    flat.write_text('n_layer = 2\ndata = "bible"\noptimizer = "adamw"\nrefresh_every = 3\n'
                    'seed = 7\n')
    assert load_toml(sections) == load_toml(flat) == {
        "n_layer": 2, "data": "bible", "optimizer": "adamw", "refresh_every": 3, "seed": 7}


def test_the_old_hessian_names_are_read_as_refresh_names(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text("hessian_every = 4\nhessian_fraction = 0.5\n")
    assert load_toml(old) == {"refresh_every": 4, "refresh_fraction": 0.5}
    config = make_config("tiny", {"hessian_every": 4})
    assert config.optimizer.refresh_every == 4


@pytest.mark.parametrize("text, message", [
    ('[optimizer_settings]\nlr = 1.0\n', "unknown section [optimizer_settings]"),
    ('[model]\nlr = 1.0\n', "unknown setting 'lr' in [model]"),
    ('n_layers = 2\n', "unknown setting 'n_layers' (did you mean 'n_layer'?)"),
])
def test_a_setting_in_the_wrong_place_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SophiaError) as raised:
        load_toml(path)
    assert message in str(raised.value)


def test_to_dict_round_trips_through_make_config():
    config = make_config("tiny", {"optimizer": "lion", "n_layer": 2, "seed": 3, "lr": 5e-4})
    saved = to_dict(config)
    assert set(saved) == {"preset", *SECTIONS}
    assert make_config("tiny", saved) == config


def test_unset_optimizer_hyperparameters_come_from_the_presets_row():
    for name, row in PRESETS["gpt2-small"].optimizers.items():
        settings = make_config("gpt2-small", {"optimizer": name}).optimizer
        assert (settings.lr, settings.min_lr, settings.betas, settings.weight_decay,
                settings.rho) == (row.lr, row.min_lr, row.betas, row.weight_decay, row.rho)


def test_a_resumed_run_keeps_its_model_data_and_optimizer():
    fixed = set(fixed_on_resume())
    assert {"n_layer", "n_head", "n_embd", "block_size", "dropout"} <= fixed
    assert {"data", "tokenizer", "bpe_vocab_size", "val_fraction", "optimizer"} <= fixed
    assert not {"lr", "min_lr", "max_steps", "warmup_steps", "cache_dir", "out_dir"} & fixed


def test_compare_gives_each_optimizer_its_row_and_keeps_the_shared_settings(tmp_path):
    base = make_config("tiny", {"optimizer": "sophiag", "n_layer": 2, "refresh_every": 4,
                                "max_steps": 30})
    run = _run_config(base, {}, "adamw", 2.0, seed=5, run_dir=tmp_path)
    row = PRESETS["tiny"].optimizers["adamw"]
    assert run.optimizer.name == "adamw"
    assert (run.optimizer.lr, run.optimizer.min_lr) == (2 * row.lr, 2 * row.min_lr)
    assert (run.optimizer.betas, run.optimizer.weight_decay) == (row.betas, row.weight_decay)
    assert (run.model, run.data) == (base.model, base.data)
    assert run.optimizer.refresh_every == 4 and run.run.max_steps == 30 and run.run.seed == 5


def test_flatten_reads_a_flat_dict_unchanged():
    values = {"n_layer": 3, "lr": 1e-3, "optimizer": "adamw", "data": "bible"}
    assert flatten(values) == values


# ----------------------------------------------------- compare: no row for every optimizer
@pytest.mark.parametrize("toml", [
    "[optimizer]\nlr = 0.01\n", "lr = 0.01\n", "[optimizer]\nweight_decay = 0.0\n",
    "[optimizer]\nbeta1 = 0.5\n", "rho = 0.1\n", "min_lr = 0.0\n",
])
def test_compare_refuses_a_row_field_from_the_toml_as_it_refuses_the_flag(tmp_path, capsys,
                                                                         toml):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    name = toml.split("=")[0].split("\n")[-1].strip()
    assert main(["compare", "--config", str(path), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert f"{name} from --config {path} would apply to every compared optimizer" in err
    assert err.count("\n") == 1 and not (tmp_path / "cmp").exists()  # nothing trained


@pytest.mark.parametrize("flag", ["--lr", "--min-lr", "--beta1", "--beta2", "--weight-decay",
                                  "--rho"])
def test_compare_has_no_flag_for_a_row_field(tmp_path, capsys, flag):
    assert main(["compare", flag, "0.1", "--out", str(tmp_path / "cmp")]) == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_compare_refuses_a_row_field_from_python_overrides_too(tmp_path):
    base = make_config("tiny", {"max_steps": 1})
    with pytest.raises(SophiaError, match="lr from the overrides would apply to every"):
        compare(base, optimizers=["adamw"], lr_multipliers=[1.0], seeds=[0],
                out_dir=str(tmp_path), overrides={"lr": 0.5})


# ------------------------------------------------------- one validation, TOML and flags
@pytest.mark.parametrize("line, name", [
    ("lr = true", "lr"), ("n_layer = true", "n_layer"), ("seed = false", "seed"),
    ("[run]\nmax_steps = true", "max_steps"), ("refresh_fraction = false", "refresh_fraction"),
])
def test_a_toml_boolean_is_not_a_number(tmp_path, line, name):
    path = tmp_path / "run.toml"
    path.write_text(line + "\n")
    with pytest.raises(SophiaError, match=f"bad value (True|False) for {name}: expected"):
        load_toml(path)


@pytest.mark.parametrize("name, value", [("lr", True), ("n_layer", True), ("seed", False)])
def test_a_boolean_is_refused_for_a_number_as_the_flag_true_is(capsys, name, value):
    with pytest.raises(SophiaError, match=f"bad value {value!r} for {name}"):
        make_config("tiny", {name: value})
    assert main(["train", f"--{name.replace('_', '-')}", "true"]) == 2
    assert f"bad value 'true' for --{name.replace('_', '-')}" in capsys.readouterr().err


def test_a_toml_value_and_the_same_flag_get_the_same_verdict(tmp_path, capsys):
    for name, value in [("n_layer", "0"), ("dropout", "1.0"), ("val_fraction", "0.5"),
                        ("tokenizer", '"words"'), ("max_steps", "2.5")]:
        path = tmp_path / f"{name}.toml"
        path.write_text(f"{name} = {value}\n")
        from_toml = main(["train", "--config", str(path)])
        toml_error = capsys.readouterr().err
        flag = f"--{name.replace('_', '-')}"
        from_flag = main(["train", flag, value.strip('"')])
        flag_error = capsys.readouterr().err
        assert from_toml == from_flag == 2
        assert flag in flag_error, name  # the message names what the user typed

        def same(error: str, flag: str = flag, name: str = name) -> str:
            return error.replace("'", "").replace(f" in {flag}", "").replace(flag, name)

        assert same(toml_error) == same(flag_error), name


# ------------------------------------------------------- the rules beside the fields
def test_row_fields_are_the_fields_marked_row_not_those_defaulting_to_none():
    assert ROW_FIELDS == ("lr", "min_lr", "beta1", "beta2", "weight_decay", "rho")
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert (f.name in ROW_FIELDS) == bool(f.metadata.get("row")), f.name


def test_every_setting_has_a_doc_beside_it_and_the_flag_help_shows_it(capsys):
    for name in FLAT:
        assert field_doc(name), name
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "warmup, constant lr, then a linear decay" in " ".join(capsys.readouterr().out.split())


def _outside(f: dataclasses.Field) -> list:
    """Values just outside each bound beside ``f`` (integers for int fields)."""
    bounds, step = f.metadata["bounds"], 1 if f.type in ("int", int) else 0.5
    values = []
    if bounds["ge"] is not None:
        values.append(bounds["ge"] - step)
    if bounds["gt"] is not None:
        values.append(bounds["gt"])
    if bounds["le"] is not None:
        values.append(bounds["le"] + step)
    if bounds["lt"] is not None:
        values.append(bounds["lt"])
    return [int(v) if step == 1 else float(v) for v in values]


BOUNDED = [(flat_name(f), value) for cls in SECTIONS.values() for f in dataclasses.fields(cls)
           for value in _outside(f)]


def test_the_bounded_settings_are_the_ones_expected():
    assert {name for name, _ in BOUNDED} >= {
        "n_layer", "dropout", "val_fraction", "bpe_vocab_size", "lr", "beta1", "beta2",
        "decay_fraction", "refresh_fraction", "seed", "threads", "eval_every", "max_steps"}


@pytest.mark.parametrize("name, value", BOUNDED)
def test_a_value_outside_a_bound_beside_its_field_is_refused_naming_it(name, value):
    with pytest.raises(SophiaError, match=f"^{name} must be (at least|above|at most|below|in) "):
        make_config("tiny", {name: value})
