#!/usr/bin/env bash
# The value study's long CPU runs (docs/WHEN_TO_USE_SOPHIA.md). Each step is one `sophia compare`
# call into a comparison folder under runs/value/; after it, that folder's report for the step's
# optimizer is copied to experiments/value/<folder>/results-<optimizer>.json and committed (that
# path only), so a stop loses at most the run in flight. compare reuses finished runs, so a
# rerun continues where it stopped, and a call whose runs are all finished only reports them;
# `python experiments/value/tables.py` reads every committed report.
#
#   nice -n 19 experiments/value/queue.sh QUEUE     # one core each; queues below
#
# Never edit this file while a queue runs from it (bash reads a script as it goes): write a new
# file and move it over this one.
set -euo pipefail
OUT=${VALUE_OUT:-runs/value}
COMMIT=${VALUE_COMMIT:-1}
here=$(cd "$(dirname "$0")" && pwd)
save() {  # save FOLDER OPTIMIZER MESSAGE: the folder's report, kept and committed
  local folder=$1 optimizer=$2 message=$3 tries=0 target
  target="$here/$folder/results-$optimizer.json"
  mkdir -p "$here/$folder"
  cp "$OUT/$folder/results.json" "$target.tmp"
  mv "$target.tmp" "$target"
  [ "$COMMIT" = 1 ] || return 0
  until git add "$target" && git commit -q -m "value study: $message" -- "$target"; do
    tries=$((tries + 1)); [ "$tries" -lt 30 ] || break; sleep 10
  done
}
one() {  # one FOLDER OPTIMIZER MULTIPLIER SEED [extra flags]: one run, then its report
  local folder=$1 optimizer=$2 multiplier=$3 seed=$4; shift 4
  OMP_NUM_THREADS=1 sophia compare --optimizers "$optimizer" --lr-grid "$multiplier" \
    --seed "$seed" --seeds 1 --threads 1 --no-progress --out "$OUT/$folder" "$@"
  save "$folder" "$optimizer" "$folder $optimizer x$multiplier seed $seed"
}
small() { one "$1" "$2" "$3" "$4" --preset small "${@:5}"; }
tiny() {  # tiny OPTIMIZER GRID FIRST_SEED SEEDS: 800 steps (80 refreshes), then the report
  local optimizer=$1 grid=$2 first=$3 seeds=$4
  OMP_NUM_THREADS=1 sophia compare --preset tiny --optimizers "$optimizer" --lr-grid "$grid" \
    --seed "$first" --seeds "$seeds" --max-steps 800 --eval-every 100 --threads 1 \
    --no-progress --out "$OUT/tiny-800"
  save tiny-800 "$optimizer" "tiny-800 $optimizer grid $grid, seeds $first+$seeds"
}
case "${1:?a queue name}" in
  # The small rung, 2000 steps, fully decayed, at today's rows: a second seed of AdamW and
  # Sophia-G (seed 0: experiments/map/small-2000). Not run yet for CPU time (each run is
  # 40-80 minutes of a loaded core): the h = 0 controls on seed 0 (Lion at x1/3 of its row
  # = 3.33e-4; Sophia-G never refreshed) and a third seed.
  a) small small-seeds adamw 1 1 ;;
  b) small small-seeds sophiag 1 1 ;;
  a2) small small-seeds adamw 1 2 ;;
  b2) small small-seeds sophiag 1 2 ;;
  controls) small small-lion lion 0.333 0
            small small-norefresh sophiag 1 0 --refresh-every 1000000 ;;
  # The lr grid at the 2000-step horizon (the rows came from a 200-step pilot): seed 0 at x3
  # and x1/3 of each row, one folder per multiplier; then Lion's seeds 1-2.
  grid-sophiag-up) small small-x3 sophiag 3 0 ;;
  grid-sophiag-down) small small-x0.333 sophiag 0.333 0 ;;
  grid-sophiag-down2) small small-x0.111 sophiag 0.111 0 ;;
  grid-sophiag-up2) small small-x9 sophiag 9 0 ;;
  grid-adamw-up) small small-x3 adamw 3 0 ;;
  grid-adamw-down) small small-x0.333 adamw 0.333 0 ;;
  grid-adamw-up2) small small-x9 adamw 9 0 ;;
  grid-adamw-up3) small small-x27 adamw 27 0 ;;
  # Seeds 1-2 at an optimizer's interior best, each in a folder of its own so no committed
  # report is replaced by a report of fewer runs (a fresh checkout has no runs/ to reuse).
  adamw-x3-seed1) small small-x3-seeds adamw 3 1 ;;
  adamw-x3-seed2) small small-x3-seeds adamw 3 2 ;;
  adamw-x9-seed1) small small-x9-seeds adamw 9 1 ;;
  adamw-x9-seed2) small small-x9-seeds adamw 9 2 ;;
  lion-x1-seed1) small small-lion-x1-seeds lion 1 1 ;;
  lion-x1-seed2) small small-lion-x1-seeds lion 1 2 ;;
  grid-lion-up2) small small-x9 lion 3 0 ;;
  norefresh) small small-norefresh sophiag 1 0 --refresh-every 1000000 ;;
  # Where the clip binds, per parameter kind, every 100 steps of Sophia-G's seed-0 run at its
  # best lr (it repeats that committed run; its final loss checks the repeat).
  diagnose-sophiag)
    OMP_NUM_THREADS=1 python "$here/clip_by_kind.py" "$here/small-seeds/results-sophiag.json" \
      --seed 0 --out "$OUT/clip-by-kind" --json "$here/small-diagnosis/sophiag-seed0.json"
    [ "$COMMIT" = 1 ] && git add "$here/small-diagnosis/sophiag-seed0.json" && \
      git commit -q -m "value study: Sophia-G's clip by parameter kind, small preset, seed 0" \
        -- "$here/small-diagnosis/sophiag-seed0.json" ;;
  grid-lion-up) small small-x3 lion 1 0 ;;
  grid-lion-down) small small-x0.333 lion 0.111 0 ;;
  lion-seeds) small small-lion lion 0.333 1
              small small-lion lion 0.333 2 ;;
  lion-seed1) small small-lion lion 0.333 1 ;;
  lion-seed2) small small-lion lion 0.333 2 ;;
  # Sophia-G with a 5x longer warmup (500 steps; Wen et al. needed 4000 of ~10k at 130M).
  warmup-sophiag) small small-warmup500 sophiag 1 0 --warmup-steps 500 ;;
  # The hybrids on the small preset, seed 0, each side at x1 and x3.33 of its row (the tiny
  # preset's best multiplier was x3.33 for both parts).
  hybrids-small) small small-hybrids-x1 muon-adamw 1 0
                 small small-hybrids-x1 muon-sophiag 1 0
                 small small-hybrids-x3.33 muon-adamw 3.33 0
                 small small-hybrids-x3.33 muon-sophiag 3.33 0 ;;
  hybrid-adamw-x3.33) small small-hybrids-x3.33 muon-adamw 3.33 0 ;;
  hybrid-sophiag-x3.33) small small-hybrids-x3.33 muon-sophiag 3.33 0 ;;
  # Muon on the hidden matrices with Sophia-G (or, the control, AdamW) on embeddings, head and
  # the rest, each tuned on its own part: the seed-0 grid, then seeds 1-4 at the best.
  muon-adamw) tiny muon-adamw 1,3.33,10,30 0 5 ;;
  muon-sophiag-grid) tiny muon-sophiag 3.33,10,30 0 1 ;;
  # Seeds 1-4 at x10 run beside the grid, ahead of its verdict (the 300-step pilot's best was
  # 1e-2 = x10); `muon-sophiag` then reports the grid and the seeds at its best, training only
  # what is missing.
  muon-sophiag-seeds-1) tiny muon-sophiag 10 1 2 ;;
  muon-sophiag-seeds-3) tiny muon-sophiag 10 3 2 ;;
  # The grid's best was its lowest point (x3.33): x1 extends it, and seeds 1-4 run at x3.33.
  muon-sophiag-low) tiny muon-sophiag 1 0 1 ;;
  muon-sophiag-best-1) tiny muon-sophiag 3.33 1 2 ;;
  muon-sophiag-best-3) tiny muon-sophiag 3.33 3 2 ;;
  muon-sophiag) tiny muon-sophiag 1,3.33,10,30 0 5 ;;
  *) echo "unknown queue $1" >&2; exit 2 ;;
esac
