"""Where Sophia-G loses to AdamW on the tiny preset: per-kind clip, step and curvature statistics.

Trains the harness's tiny GPT (same data, schedule, clipping and Hessian cadence as
``sophia train --preset tiny``) once with AdamW and once with SophiaG — or with SophiaG
variants given as constructor keywords — and prints, at a few steps and per parameter kind
(token/position embeddings, attention and MLP matrices, LayerNorm weights, biases):

* ``unclipped``: the fraction of coordinates with |m| < ρh (the clip leaves them alone);
* ``ratio``: the median of |m| / (ρh) (above 1: clipped);
* ``step/lr``: Sophia's mean per-coordinate step in units of its lr, and AdamW's
  ``|m̂| / (√v̂ + ε)`` in units of *its* lr, so the two step sizes compare directly;
* ``h/(B·v)``: the median ratio of Sophia's h to an AdamW-style second moment of the training
  gradient (v, β2 = 0.95, bias-corrected) times the tokens per batch B — both estimate a
  per-token second moment of the gradient when the batch gradient is mostly noise, so 1 means
  "h has the scale of AdamW's preconditioner"; far below 1: h is small against the gradient.

Usage::

    python experiments/sophia_diagnosis.py                       # AdamW vs SophiaG, 200 steps
    python experiments/sophia_diagnosis.py --sophia bias_correction=true --sophia rho=0.5
    python experiments/sophia_diagnosis.py --steps 800 --seeds 0,1,2 --no-adamw

Each run prints its final validation loss (the harness's 8 fixed batches); runs use one thread.
"""

from __future__ import annotations

import argparse
import math
import time
import tomllib

import torch
import torch.nn.functional as F

import sophia_pytorch
from sophia_pytorch.harness.data import BatchSampler, prepare_data
from sophia_pytorch.harness.model import GPT, GPTConfig
from sophia_pytorch.harness.schedule import warmup_cosine

EVAL_SEED = 20230523  # the harness's evaluation windows
KINDS = ("tok_emb", "pos_emb", "attn", "mlp", "norm", "bias")


def kind_of(name: str) -> str:
    if name.startswith("wte"):
        return "tok_emb"
    if name.startswith("wpe"):
        return "pos_emb"
    if name.endswith("bias"):
        return "bias"
    if ".ln_" in name or name.startswith("ln_f"):
        return "norm"
    return "attn" if ".attn." in name else "mlp"


def parse_options(pairs: list[str]) -> dict:
    """``key=value`` pairs, values read as TOML literals (true, 0.5, "tensor", [0.1, 0.5])."""
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = tomllib.loads(f"v = {value}")["v"]
        if isinstance(options[key], list):
            options[key] = tuple(options[key])
    return options


def build(name: str, model: torch.nn.Module, args, options: dict):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    if name == "adamw":
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0}]
        return torch.optim.AdamW(groups, lr=args.adamw_lr, betas=(0.9, 0.95))
    kwargs = dict(lr=args.sophia_lr, betas=(0.965, 0.99), rho=2.0, weight_decay=0.2)
    kwargs.update(options)
    wd = kwargs.pop("weight_decay")
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    if args.embedding_rho is not None:  # the (tied) embeddings in a group of their own
        embeddings = {id(model.wte.weight), id(model.wpe.weight)}
        groups = [
            {"params": [p for p in decay if id(p) not in embeddings], "weight_decay": wd},
            {"params": [p for p in decay if id(p) in embeddings], "weight_decay": wd,
             "rho": args.embedding_rho},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    return sophia_pytorch.SophiaG(groups, **kwargs)


def stats_row(model, optimizer, shadow_v, tokens_per_batch: int, step: int) -> dict:
    """Per-kind statistics of the optimizer's current state."""
    rows: dict[str, dict[str, list]] = {k: {"n": [], "unclipped": [], "ratio": [], "step": [],
                                             "h_over_bv": []} for k in KINDS}
    adam = isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            name = next(n for n, q in model.named_parameters() if q is p)
            row = rows[kind_of(name)]
            row["n"].append(p.numel())
            if adam:
                t = float(state["step"])
                m_hat = state["exp_avg"] / (1 - 0.9 ** t)
                v_hat = state["exp_avg_sq"] / (1 - 0.95 ** t)
                row["step"].append((m_hat.abs() / (v_hat.sqrt() + 1e-8)).clamp(max=10).sum())
                continue
            rho = optimizer.effective_rho(p) if hasattr(optimizer, "effective_rho") \
                else group["rho"]
            h = optimizer.effective_hessian(p) if hasattr(optimizer, "effective_hessian") \
                else state["hessian"]
            denom = (rho * h).clamp(min=group["eps"])
            ratio = state["exp_avg"].abs() / denom
            row["unclipped"].append((ratio < 1).sum())
            row["ratio"].append(ratio.flatten())
            row["step"].append(ratio.clamp(max=1).sum())
            v = shadow_v[p] / (1 - 0.95 ** step)
            row["h_over_bv"].append((h / (tokens_per_batch * v).clamp(min=1e-30)).flatten())
    out = {}
    for kind, row in rows.items():
        if not row["n"]:
            continue
        n = sum(row["n"])
        entry = {"step/lr": float(sum(row["step"])) / n}
        if not adam:
            entry["unclipped"] = float(sum(row["unclipped"])) / n
            entry["ratio"] = float(torch.cat(row["ratio"]).median())
            entry["h/(B·v)"] = float(torch.cat(row["h_over_bv"]).median())
        out[kind] = entry
    return out


def run(name: str, seed: int, args, options: dict, data) -> tuple[float, dict[int, dict]]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=64, n_layer=4, n_head=4,
                          n_embd=128, dropout=0.0))
    optimizer = build(name, model, args, options)
    lr0 = optimizer.param_groups[0]["lr"]
    train = BatchSampler(data.train, 32, 64, seed=seed)
    val = BatchSampler(data.val, 32, 64, seed=EVAL_SEED)
    generator = torch.Generator().manual_seed(seed + 1)
    shadow_v = {p: torch.zeros_like(p) for p in model.parameters()}
    report: dict[int, dict] = {}
    refresh_rows = 8
    for step in range(args.steps):
        lr = warmup_cosine(step, lr=lr0, min_lr=lr0 / 10, warmup_steps=20, max_steps=args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = train.get(step)
        if name != "adamw" and optimizer.hessian_due():  # refresh_at_start: before step 1
            refresh(model, optimizer, x[:refresh_rows], generator)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if args.trace and step % 10 == 0:
            unclipped = optimizer.unclipped_fraction() if name != "adamw" else float("nan")
            print(f"    trace step {step} loss {float(loss):.3f} grad_norm {float(grad_norm):.2f}"
                  f" unclipped {unclipped:.3f}", flush=True)
        with torch.no_grad():
            for p in model.parameters():
                shadow_v[p].mul_(0.95).addcmul_(p.grad, p.grad, value=0.05)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if name != "adamw" and optimizer.hessian_due():
            refresh(model, optimizer, x[:refresh_rows], generator)
        if step + 1 in args.report_at:
            report[step + 1] = stats_row(model, optimizer, shadow_v, 32 * 64, step + 1)
    with torch.no_grad():
        losses = []
        for index in range(8):
            x, y = val.get(index)
            logits = model(x)
            losses.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                y.reshape(-1))))
    return sum(losses) / len(losses), report


def refresh(model, optimizer, x, generator) -> None:
    loss, num_samples = sophia_pytorch.sampled_cross_entropy(model(x), generator=generator)
    loss.backward()
    optimizer.update_hessian(scale=num_samples)
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--sophia-lr", type=float, default=1e-3)
    parser.add_argument("--sophia", action="append", default=[], metavar="KEY=VALUE",
                        help="SophiaG constructor keyword (TOML literal value); repeatable")
    parser.add_argument("--embedding-rho", type=float, default=None,
                        help="a rho of their own for the token and position embeddings")
    parser.add_argument("--no-adamw", action="store_true")
    parser.add_argument("--trace", action="store_true",
                        help="print loss, gradient norm and unclipped fraction every 10 steps")
    parser.add_argument("--quiet", action="store_true", help="only the final losses")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.report_at = sorted({10, 50, args.steps // 2, args.steps})
    options = parse_options(args.sophia)
    data = prepare_data("default", tokenizer="byte", bpe_vocab_size=4096, val_fraction=0.05,
                        cache_dir=None, min_tokens=65)
    names = ["sophiag"] if args.no_adamw else ["adamw", "sophiag"]
    for name in names:
        finals = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            start = time.perf_counter()
            final, report = run(name, seed, args, options, data)
            finals.append(final)
            label = name if name == "adamw" else f"sophiag {options or ''}"
            print(f"{label} seed {seed}: final val loss {final:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            if args.quiet:
                continue
            for step, kinds in report.items():
                print(f"  step {step}")
                for kind, entry in kinds.items():
                    cells = "  ".join(f"{k} {v:.3g}" for k, v in entry.items())
                    print(f"    {kind:8s} {cells}")
        if len(finals) > 1:
            mean = sum(finals) / len(finals)
            spread = math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1))
            print(f"{name} mean {mean:.4f} sd {spread:.4f} over {len(finals)} seeds", flush=True)


if __name__ == "__main__":
    main()
