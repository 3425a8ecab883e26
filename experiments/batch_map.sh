#!/usr/bin/env bash
# The batch-size map: the tiny preset's model at 8, 32, 128 and 256 sequences a step (a 32x span),
# each optimizer lr-tuned per batch size on a x1/3, 1, 3 grid (seed 0), 3 seeds at the best.
# Batches of 32 and more are 32-row micro-batches accumulated (grad_accum), so every batch size
# from 32 up is evaluated on the same 8x32 validation rows; batch 8 evaluates 32 batches of 8
# (also 256 rows). One thread per compare; run two queues side by side.
#
#   experiments/batch_map.sh QUEUE        # QUEUE: a | b | c | d | e | BATCH:STEPS (see below)
#   python experiments/batch_map_table.py runs/map   # the table and the plot
#
# compare reuses finished runs, so a killed queue continues where it stopped (losing only the
# run in flight).
set -euo pipefail
OUT=${MAP_OUT:-runs/map}
OPTS=${MAP_OPTIMIZERS:-adamw,sophiag}
GRID=${MAP_GRID:-0.333,1,3}
one() {  # one BATCH STEPS [extra flags]
  local batch=$1 steps=$2; shift 2
  local micro=32 accum=$((batch / 32)) evals=8 every=$((steps / 8))
  if [ "$batch" -lt 32 ]; then micro=$batch accum=1 evals=$((256 / batch)); fi
  local seeds
  for seeds in 1 3; do  # every optimizer's lr grid first, then the extra seeds at the best
    OMP_NUM_THREADS=1 sophia compare --optimizers "$OPTS" --lr-grid "$GRID" --seeds "$seeds" \
      --threads 1 --batch-size "$micro" --grad-accum "$accum" --eval-batches "$evals" \
      --max-steps "$steps" --eval-every "$every" --no-progress \
      --out "$OUT/b$batch-s$steps" "$@"
  done
}
case "${1:?queue a, b, c, d or e}" in
  a) one 256 200 ;;                                  # equal steps, the longest
  b) one 8 200; one 32 200; one 128 200 ;;           # equal steps
  c) one 8 800; one 32 800 ;;                        # equal tokens: b8x800 = b32x200, b32x800 = b128x200
  e) one 128 200 ;;                                  # equal steps, on its own (a third queue)
  d) one 32 1600 ;;                                  # equal tokens: b32x1600 = b256x200
  *:*) one "${1%%:*}" "${1#*:}" ;;                   # BATCH:STEPS, one rung on its own
esac
