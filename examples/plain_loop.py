"""Sophia-G in a plain PyTorch loop: a tiny character-level transformer on the Zen of Python.

    python examples/plain_loop.py                      # 200 steps, fp32, a few seconds on CPU
    python examples/plain_loop.py --precision fp16     # autocast + GradScaler (CPU or CUDA)

Everything Sophia adds to an AdamW loop is in ``train``: the optimizer, and every
``refresh_every`` steps one extra forward/backward on labels drawn from the model itself.
The README's example is this loop (its lr, ρ and weight decay are ``HYPERPARAMETERS``).

ρ is checked, not assumed: the script measures the share of coordinates the clip leaves
alone (``optimizer.unclipped_fraction()``, the official code's "win rate") after every step
and exits with an error if its mean over the second half of training leaves 0.1-0.5, the
official advice (checked on runs of 200 steps or more). Below 0.1 Sophia is mostly a sign
step (signed momentum); above 0.5 the clip rarely acts. ρ = 0.4 keeps it there on this model
with ``update_hessian(scale=num_samples)``; another model or another ``scale`` convention
needs its own ρ (or ``unclipped_band``).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import math

import torch
import torch.nn.functional as F
from torch import nn

from sophia_pytorch import SophiaG, sampled_cross_entropy

HYPERPARAMETERS = {"lr": 3e-3, "rho": 0.4, "weight_decay": 0.1}
UNCLIPPED_BAND = (0.1, 0.5)
CHECKED_FROM_STEPS = 200  # a shorter run ends while h is still warming up


def zen_of_python() -> str:
    """The text of ``import this`` (shipped with Python, so nothing is downloaded)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


class TinyCharLM(nn.Module):
    """Embedding, one causal self-attention block, a linear head: ``(B, T)`` → ``(B, T, V)``."""

    def __init__(self, vocab_size: int, context: int, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))
        self.head = nn.Linear(width, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        x = self.embed(tokens) + self.position[:length]
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attended.transpose(1, 2).reshape(batch, length, -1)
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


def batches(data: torch.Tensor, context: int, batch_size: int, generator: torch.Generator):
    """Endless random windows: ``(inputs, targets)``, both ``(batch_size, context)``."""
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
        windows = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def train(steps: int = 200, refresh_every: int = 10, precision: str = "fp32",
          device: str = "cpu", seed: int = 0) -> dict:
    """Train; return ``{"losses": [per step], "refreshes": count, "parameters": count,
    "unclipped": the mean unclipped fraction over the second half of the steps}``."""
    torch.manual_seed(seed)
    text = zen_of_python()
    alphabet = sorted(set(text))
    data = torch.tensor([alphabet.index(c) for c in text])
    context, batch_size = 32, 16
    model = TinyCharLM(len(alphabet), context).to(device)
    optimizer = SophiaG(model.parameters(), **HYPERPARAMETERS, refresh_every=refresh_every)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    labels = torch.Generator(device=device).manual_seed(seed + 1)  # the refresh's own draws

    losses, unclipped, refreshes = [], [], 0
    stream = batches(data, context, batch_size, torch.Generator().manual_seed(seed))
    for _, (inputs, targets) in zip(range(steps), stream):
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast():
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

        if optimizer.hessian_due():  # after steps k, 2k, ...: refresh h on this batch
            with autocast():
                logits = model(inputs)
            sampled, num_samples = sampled_cross_entropy(logits.float(), generator=labels)
            scaler.scale(sampled).backward()
            refreshes += optimizer.update_hessian(
                scale=num_samples, grad_scale=scaler.get_scale() if scaler.is_enabled() else None)
            optimizer.zero_grad(set_to_none=True)
        unclipped.append(optimizer.unclipped_fraction())
    parameters = sum(p.numel() for p in model.parameters())
    second_half = unclipped[len(unclipped) // 2:]
    return {"losses": losses, "refreshes": refreshes, "parameters": parameters,
            "unclipped": sum(second_half) / max(len(second_half), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: a model this small gains nothing "
                             "from more, and on a busy machine they wait for each other)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = train(args.steps, args.refresh_every, args.precision, args.device)
    losses = result["losses"]
    print(f"{result['parameters']:,} parameters, {args.steps} steps, "
          f"{result['refreshes']} Hessian refreshes: loss {losses[0]:.3f} -> "
          f"{sum(losses[-10:]) / len(losses[-10:]):.3f} (mean of the last 10 steps); "
          f"unclipped fraction {result['unclipped']:.2f} (mean of the second half)")
    low, high = UNCLIPPED_BAND
    if args.steps >= CHECKED_FROM_STEPS and not low <= result["unclipped"] <= high:
        raise SystemExit(
            f"unclipped fraction {result['unclipped']:.2f} is outside {low}-{high}: rho "
            f"{HYPERPARAMETERS['rho']} does not suit this run; raise rho if it is below "
            f"{low}, lower it if above {high} (or pass unclipped_band=({low}, {high}))")
    return result


if __name__ == "__main__":
    main()
