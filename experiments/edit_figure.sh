#!/bin/bash
# The README's editing figures (docs/edit/*.png): a smoke-preset run on the real CIFAR-10 subset, then
# every task on the first six images of that subset (seed 0). Takes ~15 CPU-minutes in all on 2 cores.
#   bash experiments/edit_figure.sh [RUN_DIR] [DATA]
set -euo pipefail
RUN=${1:-runs/edit-smoke}
DATA=${2:-../shared/data/cifar10-subset}
OUT=docs/edit
SCRATCH=$(mktemp -d)
[ -d "$RUN/checkpoints" ] || python -m scgcm.train --config.preset smoke --config.data.source "$DATA" --config.workdir "$RUN"
edit() { name=$1; shift; python -m scgcm.edit --workdir "$RUN" --seed 0 --out "$SCRATCH/$name.npz" --grid "$OUT/$name.png" "$@"; }
edit inpaint      --task inpaint   --input "$DATA" --num 6 --mask center
edit inpaint_heun --task inpaint   --input "$DATA" --num 6 --mask center --sampler heun
edit colorize     --task colorize  --input "$DATA" --num 6
edit superres     --task superres  --input "$DATA" --num 6 --factor 2
edit stroke       --task stroke    --input "$DATA" --num 6
edit denoise      --task denoise   --input "$DATA" --num 6
edit interpolate  --task interpolate --num 4 --num-frames 8
