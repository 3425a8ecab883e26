#!/usr/bin/env bash
# The value study's long CPU runs (docs/WHEN_TO_USE_SOPHIA.md): each step is one `sophia compare`
# call that trains one run into a comparison folder under runs/value/, then copies that folder's
# results.json to experiments/value/<folder>/ and commits it (that path only), so a stop loses
# at most the run in flight. compare reuses finished runs, so a rerun continues where it stopped.
#
#   nice -n 19 experiments/value/queue.sh a     # queue a | b | c (one core each)
set -euo pipefail
OUT=${VALUE_OUT:-runs/value}
COMMIT=${VALUE_COMMIT:-1}
here=$(cd "$(dirname "$0")" && pwd)
one() {  # one FOLDER OPTIMIZER MULTIPLIER SEED [extra flags]: one run, then its results.json
  local folder=$1 optimizer=$2 multiplier=$3 seed=$4; shift 4
  OMP_NUM_THREADS=1 sophia compare --optimizers "$optimizer" --lr-grid "$multiplier" \
    --seed "$seed" --seeds 1 --threads 1 --no-progress --out "$OUT/$folder" "$@"
  save "$folder" "$folder $optimizer x$multiplier seed $seed"
}
save() {  # save FOLDER MESSAGE: copy its results.json here (atomically) and commit that path
  local folder=$1 message=$2 tries=0
  mkdir -p "$here/$folder"
  cp "$OUT/$folder/results.json" "$here/$folder/results.json.tmp"
  mv "$here/$folder/results.json.tmp" "$here/$folder/results.json"
  [ "$COMMIT" = 1 ] || return 0
  until git add "$here/$folder/results.json" &&
      git commit -q -m "value study: $message" -- "$here/$folder/results.json"; do
    tries=$((tries + 1)); [ "$tries" -lt 30 ] || break; sleep 10
  done
}
small() { one "$1" "$2" "$3" "$4" --preset small "${@:5}"; }
tiny() {  # tiny OPTIMIZER GRID: the lr grid on seed 0, then seeds 1-4 at the best, 800 steps
  local optimizer=$1 grid=$2
  OMP_NUM_THREADS=1 sophia compare --preset tiny --optimizers "$optimizer" --lr-grid "$grid" \
    --seeds 5 --max-steps 800 --eval-every 100 --threads 1 --no-progress --out "$OUT/tiny-800"
  save tiny-800 "tiny-800 $optimizer grid $grid, 5 seeds"
}
case "${1:?queue a, b or c}" in
  # the small rung, 2000 steps, fully decayed: paired seeds at today's rows, then the h = 0
  # controls (Lion at x1/3 of its row = 3.33e-4; Sophia-G never refreshed)
  a) small small-seeds adamw 1 1; small small-seeds adamw 1 2
     small small-lion lion 0.333 0 ;;
  b) small small-seeds sophiag 1 1; small small-seeds sophiag 1 2
     small small-norefresh sophiag 1 0 --refresh-every 1000000 ;;
  # Muon on the hidden matrices with Sophia-G (or, the control, AdamW) on embeddings, head and
  # the rest, each tuned on its own part; AdamW alone as the reference. 800 steps (80 refreshes).
  c) tiny muon-adamw 1,3.33,10,30; tiny muon-sophiag 0.333,1,3.33,10; tiny adamw 0.333,1,3 ;;
  *) echo "unknown queue $1" >&2; exit 2 ;;
esac
