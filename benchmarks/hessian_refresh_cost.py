"""Amortized cost of Sophia-G's Hessian refresh, and its effect on the loss.

Trains the ``tiny`` preset with Sophia-G (refresh every k steps) once per batch fraction
used for the refresh, same seed and data order, and prints for each: the time the refreshes
took as a share of all training time (both measured inside the same run by the loop's
timers), the time per step, and the final validation loss.

    python benchmarks/hessian_refresh_cost.py --steps 200 --threads 1
"""

from __future__ import annotations

import argparse

from sophia_pytorch.harness.config import make_config
from sophia_pytorch.harness.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="k, steps between refreshes")
    parser.add_argument("--fractions", default="1,0.5,0.25")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="runs/hessian-refresh-cost")
    args = parser.parse_args()
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        config = make_config("tiny", dict(
            optimizer="sophiag", max_steps=args.steps, refresh_every=args.every,
            refresh_fraction=fraction, threads=args.threads, progress=False,
            out_dir=f"{args.out}/fraction-{fraction:g}",
        ))
        result = train(config, overwrite=True)
        rows.append((fraction, result))
    print(f"k = {args.every}, {args.steps} steps of the tiny preset, Sophia-G")
    print(f"{'fraction':>8s} {'refresh % of time':>18s} {'s/step':>7s} {'refresh s':>10s} "
          f"{'final val loss':>15s}")
    for fraction, result in rows:
        share = 100 * result.hessian_seconds / result.train_seconds
        print(f"{fraction:8g} {share:17.1f}% {result.train_seconds / result.steps:7.3f} "
              f"{result.hessian_seconds:10.1f} {result.final_val_loss:15.4f}")


if __name__ == "__main__":
    main()
