"""``SophiaTrainer`` refreshes what the model's own loss sees, for every head it supports:
sequence classification (no shift across the batch), regression (a Gaussian, never a zero
Hessian), multi-label (a Bernoulli), masked LM (no shift). Tiny models built from configs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    TrainingArguments,
)

from sophia_pytorch import (  # noqa: E402
    sampled_binary_cross_entropy,
    sampled_cross_entropy,
    sampled_gaussian_nll,
)
from sophia_pytorch.integrations.transformers import SophiaTrainer, head_of  # noqa: E402
from tests.integrations.helpers import LENGTH, PAD, VOCAB, RefreshSpy, hessians_of  # noqa: E402

ROWS = 16


def _config(**overrides) -> GPT2Config:
    settings = dict(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                    bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
    settings.update(overrides)
    return GPT2Config(**settings)


def _classifier(seed: int = 0, **config) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(_config(**config))


def _rows(count: int, label, seed: int = 0) -> list[dict]:
    """Random token rows (no padding) whose label is ``label(last_token)``."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=generator)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                     "labels": label(int(ids[-1]))})
    return rows


def _args(folder, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(folder), per_device_train_batch_size=ROWS, max_steps=2,
                    use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                    disable_tqdm=True, learning_rate=3e-3, weight_decay=0.0, seed=0,
                    dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


class Recorder(SophiaTrainer):
    """Records the refresh's (logits, mask) shapes and the sampled loss it used."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refresh_shapes: list[tuple] = []
        self.losses_used: list = []

    def hessian_logits_and_mask(self, model, inputs):
        logits, mask = super().hessian_logits_and_mask(model, inputs)
        self.refresh_shapes.append((tuple(logits.shape),
                                    None if mask is None else tuple(mask.shape)))
        return logits, mask

    def hessian_loss_of(self, model, inputs):
        from sophia_pytorch.refresh import sampled_loss

        chosen = super().hessian_loss_of(model, inputs)
        self.losses_used.append(sampled_loss(chosen))
        return chosen


def _train(folder, model, rows, trainer_class=Recorder, **kwargs):
    sophia_kwargs = kwargs.pop("sophia_kwargs", {"refresh_every": 1})
    trainer = trainer_class(model=model, args=_args(folder, **kwargs.pop("args", {})),
                            train_dataset=rows, sophia_kwargs=sophia_kwargs, **kwargs)
    trainer.create_optimizer()
    trainer.spy = RefreshSpy.attach(trainer.optimizer)
    trainer.train()
    return trainer


def test_head_of_reads_the_task_from_the_class():
    tiny_bert = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=16)
    assert head_of(GPT2LMHeadModel(_config())) == "causal_lm"
    assert head_of(GPT2ForSequenceClassification(_config())) == "sequence_classification"
    assert head_of(GPT2ForTokenClassification(_config())) == "token_classification"
    assert head_of(BertForMaskedLM(tiny_bert)) == "masked_lm"
    assert head_of(torch.nn.Linear(2, 2)) is None


def test_sequence_classification_is_refreshed_on_every_row_without_a_shift(tmp_path):
    """The bug: the default shift took (16, 2) logits to (15, 2), across the batch."""
    trainer = _train(tmp_path, _classifier(num_labels=2), _rows(ROWS, lambda t: t % 2))
    assert trainer.refresh_shapes == [((ROWS, 2), (ROWS,))] * 2
    assert trainer.losses_used == [sampled_cross_entropy] * 2
    assert [call.scale for call in trainer.spy.calls] == [ROWS, ROWS]


def test_regression_head_gets_the_gaussian_estimator_and_a_nonzero_hessian(tmp_path):
    """num_labels=1: a softmax over one class would give h = 0 forever."""
    model = _classifier(num_labels=1)
    trainer = _train(tmp_path, model, _rows(ROWS, lambda t: float(t) / VOCAB))
    assert model.config.problem_type == "regression"
    assert trainer.losses_used == [sampled_gaussian_nll] * 2
    assert trainer.refresh_shapes == [((ROWS, 1), None)] * 2
    hessians = hessians_of(trainer.optimizer.optimizer)
    assert all(torch.isfinite(h).all() for h in hessians)
    assert sum(float(h.abs().sum()) for h in hessians) > 0
    assert float(hessians[-1].abs().sum()) > 0  # the score head itself


def test_multi_label_head_gets_the_bernoulli_estimator(tmp_path):
    model = _classifier(num_labels=3, problem_type="multi_label_classification")
    bits = lambda t: torch.tensor([(t >> i) & 1 for i in range(3)], dtype=torch.float32)  # noqa: E731
    trainer = _train(tmp_path, model, _rows(ROWS, bits))
    assert trainer.losses_used == [sampled_binary_cross_entropy] * 2
    assert trainer.refresh_shapes == [((ROWS, 3), None)] * 2
    assert float(hessians_of(trainer.optimizer.optimizer)[-1].abs().sum()) > 0


def test_hessian_loss_overrides_the_choice_and_cross_entropy_on_one_label_fails_clearly(
        tmp_path):
    model = _classifier(num_labels=1)
    with pytest.raises(ValueError, match="one class.*'gaussian'"):
        _train(tmp_path, model, _rows(ROWS, lambda t: float(t)), hessian_loss="cross_entropy")


def test_an_unknown_hessian_loss_is_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match="unknown hessian_loss 'mse'"):
        SophiaTrainer(model=_classifier(num_labels=1), args=_args(tmp_path), hessian_loss="mse")


def test_masked_lm_labels_are_not_shifted(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=16,
                                       max_position_embeddings=LENGTH))
    rows = _rows(ROWS, lambda t: 0)
    for row in rows:  # MLM: labels only where a token is masked out
        row["labels"] = torch.full((LENGTH,), -100)
        row["labels"][3] = row["input_ids"][3]
    trainer = _train(tmp_path, model, rows)
    assert trainer.refresh_shapes == [((ROWS, LENGTH, VOCAB), (ROWS, LENGTH))] * 2
    assert [call.scale for call in trainer.spy.calls] == [ROWS, ROWS]


class _CustomLM(torch.nn.Module):
    """A causal LM the trainer cannot recognise by its class."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = GPT2LMHeadModel(_config())

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_an_unrecognised_token_model_must_say_whether_labels_are_shifted(tmp_path):
    rows = [{**row, "labels": row["input_ids"]} for row in _rows(ROWS, lambda t: 0)]
    with pytest.raises(ValueError, match="pass shift_labels=True"):
        _train(tmp_path, _CustomLM(), rows)
    trainer = _train(tmp_path, _CustomLM(), rows, shift_labels=True)
    assert trainer.refresh_shapes == [((ROWS, LENGTH - 1, VOCAB), (ROWS, LENGTH - 1))] * 2


def _accuracy(model, rows) -> float:
    with torch.no_grad():
        ids = torch.stack([row["input_ids"] for row in rows])
        labels = torch.tensor([row["labels"] for row in rows])
        return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())


def test_sophia_trains_a_sequence_classifier(tmp_path):
    """30 steps on a parity-of-the-last-token task: training accuracy well above chance."""
    rows = _rows(128, lambda t: t % 2, seed=1)
    model = _classifier(num_labels=2)
    _train(tmp_path, model, rows, args={"max_steps": 30, "learning_rate": 1e-2},
           sophia_kwargs={"refresh_every": 2, "rho": 0.05})
    assert _accuracy(model.eval(), rows) > 0.8
