"""Sophia-G in Hugging Face's Trainer: a tiny GPT-2, built from a config, on the Zen of Python.

    pip install 'sophia-pytorch[transformers]'
    python examples/hf_trainer.py                      # 150 steps on CPU, seconds
    torchrun --nproc-per-node 2 examples/hf_trainer.py # DDP: the refresh averages over ranks

``SophiaTrainer`` is a ``transformers.Trainer``: it builds SophiaG from the TrainingArguments
(learning rate, weight decay) and ``sophia_kwargs``, and refreshes the Hessian estimate every
``refresh_every`` optimizer steps on the current batch, padding (label -100) left out.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from sophia_pytorch.integrations.transformers import SophiaTrainer


def zen_of_python() -> str:
    """The text of ``import this`` (shipped with Python, so nothing is downloaded)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def character_windows(text: str, alphabet: list[str], context: int = 32,
                      stride: int = 16) -> list[dict[str, torch.Tensor]]:
    """Windows of ``context`` characters every ``stride``; the last one padded (token 0,
    attention 0, label -100). The model shifts the labels itself."""
    tokens = torch.tensor([alphabet.index(c) + 1 for c in text])  # 0 is padding
    rows = []
    for start in range(0, len(tokens) - stride, stride):
        window = tokens[start:start + context]
        pad = context - len(window)
        ids = torch.cat([window, torch.zeros(pad, dtype=torch.long)])
        attention = torch.cat([torch.ones(len(window)), torch.zeros(pad)]).long()
        labels = torch.cat([window, torch.full((pad,), -100)])
        rows.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return rows


def train(steps: int = 150, refresh_every: int = 10, output_dir: str | None = None,
          bf16: bool = False, seed: int = 0) -> dict:
    """Train and return ``{"losses": [logged], "refreshes": count, "parameters": count}``."""
    text = zen_of_python()
    alphabet = sorted(set(text))
    context = 32
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(alphabet) + 1, n_positions=context, n_embd=64,
                        n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch, max_steps=steps, per_device_train_batch_size=16,
            learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="cosine",
            logging_steps=10, save_strategy="no", report_to=[], disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), bf16=bf16, seed=seed,
        )
        trainer = SophiaTrainer(
            model=model, args=args, train_dataset=character_windows(text, alphabet, context),
            sophia_kwargs={"rho": 0.05, "refresh_every": refresh_every},
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "refreshes": trainer.hessian_refreshes,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: a model this small gains nothing "
                             "from more, and on a busy machine they wait for each other)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = train(args.steps, args.refresh_every, bf16=args.bf16)
    losses = result["losses"]
    print(f"{result['parameters']:,} parameters, {args.steps} steps, {result['refreshes']} "
          f"Hessian refreshes: logged loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return result


if __name__ == "__main__":
    main()
