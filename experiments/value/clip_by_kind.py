"""Where Sophia's clip binds, per parameter kind, through one harness run.

Trains one run exactly as a committed comparison trained it (its results.json's
``base_config``, at a seed and lr of your choosing) and, after every ``eval_every`` steps,
records per parameter kind — ``embedding+head`` (the tied token matrix), ``position``,
``attention`` and ``mlp`` matrices, ``norm`` weights, ``bias`` — from the optimizer's state:

* ``unclipped``: the share of coordinates with ``|m| < ρ·h`` (the clip leaves them alone);
* ``step/lr``: the mean per-coordinate step in units of the lr, ``min(|m| / max(ρh, ε), 1)``
  (weight decay aside). Lion, Sophia's h = 0 limit, steps 1 everywhere: below 1, Sophia's
  step there is that much shorter than Lion's at the same lr;
* ``h``: the median of h; ``|m|``: the median of |m|.

The run's validation losses are the harness's own (``log.jsonl``); the final one is written
beside the statistics so it can be checked against the committed run it repeats. The JSON
is rewritten atomically after each record; an interrupted run resumes (same command) and
keeps the records it had.

    python experiments/value/clip_by_kind.py \\
        experiments/value/small-seeds/results-sophiag.json --seed 0 \\
        --out runs/value/clip-by-kind --json experiments/value/small-diagnosis/sophiag-seed0.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sophia_pytorch.harness.config import make_config
from sophia_pytorch.harness.jsonio import write_atomically
from sophia_pytorch.harness.trainer import Trainer

KINDS = ("embedding+head", "position", "attention", "mlp", "norm", "bias")


def kind_of(name: str) -> str:
    """The kind of the harness GPT's parameter ``name`` (``model.named_parameters()``)."""
    if name.startswith("wte."):
        return "embedding+head"
    if name.startswith("wpe."):
        return "position"
    if name.endswith(".bias"):
        return "bias"
    if ".ln_" in name or name.startswith("ln_f."):
        return "norm"
    return "attention" if ".attn." in name else "mlp"


@torch.no_grad()
def clip_statistics(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """Per kind: parameters' coordinate count, unclipped share, mean step/lr, median h and |m|.

    Reads plain float state (the harness's default); refuses 8-bit or sharded state rather
    than report numbers it did not compute from the state the step uses.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    collected: dict[str, dict[str, list[torch.Tensor]]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or "hessian" not in state:
                continue
            m, h = state["exp_avg"], state["hessian"]
            if m.dtype == torch.uint8 or type(m) is not torch.Tensor:
                raise ValueError("clip_statistics reads plain float state; run with "
                                 "state_dtype float32 or bfloat16 and without FSDP")
            m, h = m.float().flatten(), h.float().flatten()
            rho_h = group["rho"] * h
            parts = collected.setdefault(kind_of(names[id(param)]),
                                         {"ratio": [], "unclipped": [], "h": [], "m": []})
            parts["ratio"].append(m.abs() / rho_h.clamp(min=group["eps"]))
            parts["unclipped"].append(m.abs() < rho_h)  # as unclipped_fraction() counts
            parts["h"].append(h)
            parts["m"].append(m.abs())
    rows = {}
    for kind in KINDS:
        if kind not in collected:
            continue
        ratio, unclipped, h, m = (torch.cat(collected[kind][key])
                                  for key in ("ratio", "unclipped", "h", "m"))
        rows[kind] = {"coordinates": ratio.numel(),
                      "unclipped": float(unclipped.double().mean()),
                      "step/lr": float(ratio.clamp(max=1).double().mean()),
                      "h": float(h.median()), "|m|": float(m.median())}
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("results", type=Path, help="a comparison's results.json to repeat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None,
                        help="the lr (default: the base config's, its row's)")
    parser.add_argument("--out", type=Path, required=True, help="the run folder")
    parser.add_argument("--json", type=Path, required=True, help="where the records go")
    args = parser.parse_args(argv)
    base: dict[str, Any] = json.loads(args.results.read_text())["base_config"]
    if not base["optimizer"]["name"].startswith("sophia"):
        raise SystemExit(f"{args.results} compares {base['optimizer']['name']}, not Sophia")
    lr = args.lr if args.lr is not None else base["optimizer"]["lr"]
    min_lr = base["optimizer"]["min_lr"] * lr / base["optimizer"]["lr"]
    config = make_config(base["preset"], {
        **{k: v for k, v in base.items() if k != "preset"},
        "optimizer": {**base["optimizer"], "lr": lr, "min_lr": min_lr},
        "run": {**base["run"], "seed": args.seed, "out_dir": str(args.out), "progress": False,
                "checkpoint_every": base["run"]["eval_every"]}})
    every = config.run.eval_every
    records: list[dict] = []
    if args.json.exists():
        records = json.loads(args.json.read_text())["records"]
    resume = args.out if (args.out / "checkpoint.pt").exists() else None
    trainer = Trainer(config, resume=resume)
    done = {record["step"] for record in records}

    def write(final: float | None) -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.json, (json.dumps({
            "repeats": str(args.results), "optimizer": config.optimizer.name, "lr": lr,
            "seed": args.seed, "steps": config.run.max_steps, "final_val_loss": final,
            "records": sorted(records, key=lambda r: r["step"])}, indent=1) + "\n").encode())

    def on_step(record: dict[str, Any]) -> None:
        if record["step"] % every == 0 and record["step"] not in done:
            records.append({"step": record["step"], "lr": record["lr"],
                            "kinds": clip_statistics(trainer.model, trainer.optimizer)})
            done.add(record["step"])
            write(None)

    trainer.on_step = on_step
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    write(result.final_val_loss)
    print(f"{config.optimizer.name} lr {lr:g} seed {args.seed}: final val loss "
          f"{result.final_val_loss:.4f}; records in {args.json}")


if __name__ == "__main__":
    main()
