#!/usr/bin/env bash
# The digits study (issue #20): does score guidance lower the final distance, its seed-to-seed spread, or
# the gradient-norm spikes? Groups, each trained from SEEDS seeds with the digits preset (same budget for all):
#   score    (reference recipe)       vanilla  (reference recipe: plain iCT as the original code runs it)
#   ict      (--config.recipe ict, vanilla: plain iCT with the iCT paper's choices)
# Every run logs the digits classifier's distance (one- and two-step, 500 samples) every 200 updates; then
# scgcm.report groups the runs that differ only in seed (mean curves with a min-max band, mean ± std, and
# a bootstrap 95 % interval of score − vanilla) into OUT.
#   bash experiments/digits_study.sh [RUNS=runs/digits-study] [OUT=experiments/digits_study] [SEEDS="0 1 2 3"]
# The preset's own budget (1,200 updates; an earlier study stopped at 800, where the curves still fell), evaluated
# every 200: ~6 min a run on 2 quiet cores, about 75 min for all 12. A run already finished is left as it is, one
# cut off is resumed.
set -euo pipefail
RUNS=${1:-runs/digits-study}
OUT=${2:-experiments/digits_study}
SEEDS=${3:-"0 1 2 3"}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
train() {  # NAME SEED FLAGS...
  local name=$1 seed=$2; shift 2
  python -m scgcm.train --config.preset digits --config.seed "$seed" --config.workdir "$RUNS/$name-s$seed" \
    --config.saving-step 200 --config.fid.modes onestep twostep --config.sample.sampling-step 1200 \
    --config.sample.no-final-sampling "$@" > "$RUNS/$name-s$seed.log" 2>&1
}
mkdir -p "$RUNS"
runs=()
for seed in $SEEDS; do  # seed-major: a study cut short still has every group
  train score "$seed" --config.variant score
  train vanilla "$seed" --config.variant vanilla
  train ict "$seed" --config.variant vanilla --config.recipe ict
  runs+=("$RUNS/score-s$seed" "$RUNS/vanilla-s$seed" "$RUNS/ict-s$seed")
done
python -m scgcm.report "${runs[@]}" --out "$OUT"
