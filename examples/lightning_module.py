"""Sophia in Lightning: a tiny character-level transformer on the Zen of Python.

    pip install 'sophia-pytorch[lightning]'
    python examples/lightning_module.py                         # SophiaG + SophiaHessianCallback
    python examples/lightning_module.py --precision bf16-mixed
    python examples/lightning_module.py --optimizer sophiah     # SophiaH, manual optimization

Sophia-G needs only the callback: batches are ``(inputs, targets)``, so it reads the logits
from ``pl_module(inputs)`` and leaves out targets equal to -100. Sophia-H refreshes from a
closure with a double backward, which belongs in ``training_step``: ``CharLMSophiaH`` shows
the manual-optimization recipe.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io

import torch
import torch.nn.functional as F
from torch import nn

try:
    import lightning as L
except ImportError:  # the older package name
    import pytorch_lightning as L

from sophia_pytorch import SophiaG, SophiaH
from sophia_pytorch.integrations.lightning import SophiaHessianCallback
from sophia_pytorch.refresh import hutchinson


def zen_of_python() -> str:
    """The text of ``import this`` (shipped with Python, so nothing is downloaded)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def character_pairs(text: str, alphabet: list[str], context: int = 32,
                    stride: int = 8) -> torch.utils.data.TensorDataset:
    """``(inputs, targets)`` windows, targets the next characters."""
    tokens = torch.tensor([alphabet.index(c) for c in text])
    starts = range(0, len(tokens) - context - 1, stride)
    windows = torch.stack([tokens[s:s + context + 1] for s in starts])
    return torch.utils.data.TensorDataset(windows[:, :-1], windows[:, 1:])


class CharLM(L.LightningModule):
    """Embedding, one causal transformer layer, a head; SophiaG (refreshed by the callback)."""

    def __init__(self, vocab_size: int, context: int = 32, width: int = 64,
                 refresh_every: int = 10, steps: int = 150) -> None:
        super().__init__()
        self.refresh_every, self.steps = refresh_every, steps
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        self.block = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width,
                                                dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(width, vocab_size)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)
        self.losses: list[float] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` tokens → ``(B, T, vocab)`` logits."""
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:length]
        x = self.block(x, src_mask=self.causal[:length, :length], is_causal=True)
        return self.head(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs).float().flatten(0, 1), targets.flatten())

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        optimizer = SophiaG(self.parameters(), lr=3e-3, rho=0.05, weight_decay=0.1,
                            refresh_every=self.refresh_every)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class CharLMSophiaH(CharLM):
    """The same model with SophiaH: manual optimization, the refresh in ``training_step``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.probes = torch.Generator().manual_seed(0)  # the same seed on every rank

    def training_step(self, batch, batch_idx):
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        loss = self.loss(batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        schedule.step()
        sophia = optimizer.optimizer  # the SophiaH inside Lightning's wrapper
        if sophia.hessian_due():
            # double backward on this batch; unscales under 16-mixed, averages over DDP ranks
            hutchinson(sophia, lambda: self.loss(batch), generator=self.probes,
                               scaler=getattr(self.trainer.precision_plugin, "scaler", None))
        self.losses.append(float(loss.detach()))

    def configure_optimizers(self):
        optimizer = SophiaH(self.parameters(), lr=3e-3, rho=0.05, weight_decay=0.1,
                            refresh_every=self.refresh_every)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train(steps: int = 150, refresh_every: int = 10, optimizer: str = "sophiag",
          precision: str = "32-true", accumulate_grad_batches: int = 1, seed: int = 0) -> dict:
    """Train and return ``{"losses": [per micro-batch], "refreshes": count, "steps": count}``."""
    L.seed_everything(seed, verbose=False)
    text = zen_of_python()
    alphabet = sorted(set(text))
    module_class = CharLMSophiaH if optimizer == "sophiah" else CharLM
    module = module_class(len(alphabet), refresh_every=refresh_every, steps=steps)
    callbacks = [SophiaHessianCallback()] if optimizer == "sophiag" else []
    trainer = L.Trainer(max_steps=steps, precision=precision, callbacks=callbacks,
                        accumulate_grad_batches=accumulate_grad_batches, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    loader = torch.utils.data.DataLoader(character_pairs(text, alphabet), batch_size=16,
                                         shuffle=True)
    trainer.fit(module, loader)
    (sophia,) = trainer.optimizers
    return {"losses": module.losses, "refreshes": sophia.refreshes_done(),
            "steps": sophia.steps_taken()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--optimizer", choices=["sophiag", "sophiah"], default="sophiag")
    parser.add_argument("--precision", default="32-true",
                        help="32-true, bf16-mixed, or 16-mixed (on a GPU)")
    parser.add_argument("--accumulate-grad-batches", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: a model this small gains nothing "
                             "from more, and on a busy machine they wait for each other)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = train(args.steps, args.refresh_every, args.optimizer, args.precision,
                   args.accumulate_grad_batches)
    losses = result["losses"]
    print(f"{args.optimizer}, {result['steps']} steps, {result['refreshes']} Hessian refreshes: "
          f"loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} "
          "(mean of the last 10 batches)")
    return result


if __name__ == "__main__":
    main()
