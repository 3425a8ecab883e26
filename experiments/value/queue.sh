#!/usr/bin/env bash
# The value study's long CPU runs (docs/WHEN_TO_USE_SOPHIA.md). Each step is one `sophia compare`
# call into a comparison folder under runs/value/; after it, that folder's report for the step's
# optimizer is copied to experiments/value/<folder>/results-<optimizer>.json and committed (that
# path only), so a stop loses at most the run in flight. compare reuses finished runs, so a
# rerun continues where it stopped; `experiments/value/table.py` reads every committed report.
#
#   nice -n 19 experiments/value/queue.sh a     # queue a | b | c (one core each)
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
tiny() {  # tiny OPTIMIZER GRID: the lr grid on seed 0, then seeds 1-4 at the best, 800 steps
  local optimizer=$1 grid=$2
  OMP_NUM_THREADS=1 sophia compare --preset tiny --optimizers "$optimizer" --lr-grid "$grid" \
    --seeds 5 --max-steps 800 --eval-every 100 --threads 1 --no-progress --out "$OUT/tiny-800"
  save tiny-800 "$optimizer" "tiny-800 $optimizer grid $grid, 5 seeds"
}
case "${1:?queue a, b or c}" in
  # The small rung, 2000 steps, fully decayed, at today's rows: a second seed of AdamW and
  # Sophia-G (seed 0: experiments/map/small-2000), the two h = 0 controls on seed 0 (Lion at
  # x1/3 of its row = 3.33e-4; Sophia-G never refreshed: signed momentum with Sophia's own β1
  # and decay), then a third seed.
  a) small small-seeds adamw 1 1; small small-lion lion 0.333 0; small small-seeds adamw 1 2 ;;
  b) small small-seeds sophiag 1 1; small small-norefresh sophiag 1 0 --refresh-every 1000000
     small small-seeds sophiag 1 2 ;;
  # Muon on the hidden matrices with Sophia-G (or, the control, AdamW) on embeddings, head and
  # the rest, each tuned on its own part. 800 steps (80 refreshes).
  c) tiny muon-adamw 1,3.33,10,30; tiny muon-sophiag 3.33,10,30 ;;
  *) echo "unknown queue $1" >&2; exit 2 ;;
esac
