"""experiments/value/clip_by_kind.py: it repeats the committed run it names (same final loss as
the harness's own run of that config) and its per-kind statistics are the optimizer's state."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from experiments.value import clip_by_kind
from sophia_pytorch import SophiaG
from sophia_pytorch.harness.config import to_dict
from sophia_pytorch.harness.model import GPT, GPTConfig
from sophia_pytorch.harness.trainer import train
from tests.harness.helpers import tiny_config


def committed(tmp_path, **overrides):
    config = tiny_config(tmp_path, optimizer="sophiag", max_steps=6, eval_every=2, **overrides)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"base_config": to_dict(config)}))
    return config, path


def test_the_diagnosed_run_repeats_the_harness_run(tmp_path):
    config, results = committed(tmp_path, seed=3)
    plain = train(config)
    out = tmp_path / "records.json"
    clip_by_kind.main([str(results), "--seed", "3", "--out", str(tmp_path / "diagnosed"),
                       "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["final_val_loss"] == plain.final_val_loss  # the records do not perturb it
    assert [r["step"] for r in written["records"]] == [2, 4, 6]
    kinds = written["records"][-1]["kinds"]
    assert set(kinds) == set(clip_by_kind.KINDS)
    for row in kinds.values():
        assert 0.0 <= row["unclipped"] <= row["step/lr"] + 1e-12 <= 1.0 + 1e-12
        assert row["h"] >= 0.0


def test_statistics_match_a_float64_rederivation_and_the_optimizer(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16,
                          dropout=0.0))
    optimizer = SophiaG(model.parameters(), lr=1e-3, rho=0.05)
    x = torch.randint(0, 50, (4, 8))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        optimizer.step()
        optimizer.update_hessian(scale=32)
        optimizer.zero_grad()
    rows = clip_by_kind.clip_statistics(model, optimizer)
    total = sum(row["coordinates"] for row in rows.values())
    assert total == sum(p.numel() for p in model.parameters())
    share = sum(row["unclipped"] * row["coordinates"] for row in rows.values()) / total
    assert share == pytest.approx(optimizer.unclipped_fraction(), abs=1e-9)
    state = optimizer.state[model.wte.weight]
    ratio = state["exp_avg"].double().abs() / (0.05 * state["hessian"].double()).clamp(min=1e-12)
    assert rows["embedding+head"]["step/lr"] == pytest.approx(
        float(ratio.clamp(max=1).mean()), rel=1e-5)


def test_8bit_state_is_refused_not_misread():
    model = torch.nn.Linear(4, 4)
    optimizer = SophiaG(model.parameters(), lr=1e-3, state_dtype=torch.uint8)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="plain float state"):
        clip_by_kind.clip_statistics(model, optimizer)


def test_an_interrupted_diagnosis_resumes_and_keeps_its_records(tmp_path, monkeypatch):
    _, results = committed(tmp_path)
    out = tmp_path / "records.json"
    argv = [str(results), "--out", str(tmp_path / "run"), "--json", str(out)]
    fit = clip_by_kind.Trainer.fit

    def fit_interrupted_at_step_4(self):
        recorder = self.on_step

        def on_step(record):
            recorder(record)
            if record["step"] == 4:
                signal.raise_signal(signal.SIGINT)  # the real signal the harness handles
        self.on_step = on_step
        return fit(self)

    monkeypatch.setattr(clip_by_kind.Trainer, "fit", fit_interrupted_at_step_4)
    with pytest.raises(BaseException, match="SIGINT at step 4"):
        clip_by_kind.main(argv)
    assert [r["step"] for r in json.loads(out.read_text())["records"]] == [2, 4]
    monkeypatch.setattr(clip_by_kind.Trainer, "fit", fit)
    clip_by_kind.main(argv)  # the same command continues
    written = json.loads(out.read_text())
    assert [r["step"] for r in written["records"]] == [2, 4, 6]
    assert written["final_val_loss"] is not None
