#!/usr/bin/env bash
# The score-vs-vanilla study on this machine's CPU (issue 10): the `cpu` preset on the real CIFAR-10
# subset in ../shared/data/cifar10-subset, the same seeds and budget for every variant, then the report.
#
#   experiments/cpu_study.sh                 # seeds 1 and 2, score and vanilla
#   SEEDS="1" VARIANTS="score vanilla" RECIPES="reference ict" experiments/cpu_study.sh
#   PAIRED=1 experiments/cpu_study.sh        # the variants of a seed at once (same conditions for both)
#
# Runs go to $ROOT (default runs/study/<variant>[-ict]-s<seed>); an existing run directory is resumed,
# so the script can be stopped and started again. The report goes to $REPORT (default experiments/study).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-runs/study}
REPORT=${REPORT:-experiments/study}
SEEDS=${SEEDS:-"1 2"}
VARIANTS=${VARIANTS:-"score vanilla"}
RECIPES=${RECIPES:-"reference"}
PAIRED=${PAIRED:-0}
PY=${PYTHON:-python}
EXTRA=${EXTRA:-}

run() {  # variant recipe seed
  local name="$1$([ "$2" = ict ] && echo -ict)-s$3"
  echo "== $name $(date -u +%H:%M:%S)"
  $PY -m scgcm.train --config.preset cpu --config.variant "$1" --config.recipe "$2" --config.seed "$3" \
    --config.workdir "$ROOT/$name" $EXTRA > "$ROOT/$name.out" 2>&1 || echo "!! $name exited with $?"
  echo "== $name done $(date -u +%H:%M:%S)"
}

mkdir -p "$ROOT"
for seed in $SEEDS; do
  for recipe in $RECIPES; do
    if [ "$PAIRED" = 1 ]; then
      for variant in $VARIANTS; do run "$variant" "$recipe" "$seed" & done
      wait
    else
      for variant in $VARIANTS; do run "$variant" "$recipe" "$seed"; done
    fi
  done
done
$PY -m scgcm.report $(ls -d "$ROOT"/*/ | sort) --out "$REPORT"
