"""Settings: sections, flat names, TOML, presets' rows, what a resumed run must keep."""

from __future__ import annotations

import dataclasses

import pytest

from sophia_pytorch.harness.compare.runner import _run_config
from sophia_pytorch.harness.config import (
    FLAT,
    PRESETS,
    SECTIONS,
    fixed_on_resume,
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
